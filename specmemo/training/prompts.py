"""Training prompts for a draft head: instructions composed from templates and word lists written
for this purpose (none from MT-Bench, the shipped default prompts or any test set), spread over
the kinds of request a chat sees (writing, roleplay, reasoning, math, coding, extraction, STEM,
humanities, advice), so the target's replies to them look like a chat's without touching what
benchmarks measure. A first version with only "explain / write about <subject>" prompts gave a
head 0.59 first-token acceptance on its own held-out prompts but 0.32 on MT-Bench: breadth matters."""

import random

SUBJECTS = [
    # nature and science
    "volcanoes", "coral reefs", "honeybees", "the water cycle", "photosynthesis", "rainforests", "glaciers",
    "earthquakes", "tides", "black holes", "vaccines", "magnets", "sound waves", "friction", "DNA", "atoms",
    "the immune system", "plate tectonics", "evolution", "entropy", "rainbows", "climate change", "nuclear fusion",
    "antibiotics", "the human heart", "sleep", "the speed of light", "electric circuits", "chemical bonds",
    "quantum computing", "the periodic table", "gravity", "dinosaurs", "the Moon", "Mars", "neurons",
    # technology
    "solar panels", "electric cars", "the internet", "smartphones", "3D printers", "batteries", "GPS",
    "databases", "compilers", "machine learning", "encryption", "cloud computing", "open source software",
    "social media", "video games", "self-driving cars", "blockchain", "operating systems", "Wi-Fi",
    # society, economy, culture
    "inflation", "supply and demand", "the stock market", "remote work", "minimum wage", "democracy",
    "the Renaissance", "the Industrial Revolution", "the Roman Empire", "the Silk Road", "the printing press",
    "the Cold War", "ancient Greece", "the French Revolution", "jazz", "impressionist painting", "Shakespeare",
    "poetry", "stoicism", "utilitarianism", "urban planning", "public transport", "tourism", "globalization",
    "recycling", "meditation", "nutrition", "marathon training", "chess", "photography", "gardening",
    "learning a second language", "personal budgeting", "job interviews", "time management", "public speaking",
    # a second, broader list (more science, history, arts and everyday life: the kinds of subject a
    # chat is asked about that the first list missed)
    "mitochondria", "enzymes", "the nitrogen cycle", "ocean currents", "the ozone layer", "hurricanes",
    "supernovae", "the Big Bang", "exoplanets", "semiconductors", "lasers", "thermodynamics", "relativity",
    "probability", "prime numbers", "calculus", "statistics", "game theory", "genetic engineering", "CRISPR",
    "stem cells", "the placebo effect", "memory and the brain", "habits", "bacteria and viruses", "pandemics",
    "biodiversity", "deforestation", "renewable energy", "wind turbines", "hydrogen fuel", "desalination",
    "the Egyptian pyramids", "the Maya civilization", "the Ottoman Empire", "the Meiji Restoration",
    "the abolition of slavery", "women's suffrage", "the American Civil War", "World War I", "the Great Depression",
    "the Marshall Plan", "decolonization", "the European Union", "the United Nations", "the Enlightenment",
    "the Reformation", "Confucianism", "Buddhism", "existentialism", "Plato's cave", "Kant's ethics",
    "free will", "human rights", "the rule of law", "separation of powers", "taxation", "interest rates",
    "central banks", "trade deficits", "cryptocurrencies", "startups", "marketing", "negotiation", "leadership",
    "customer service", "supply chains", "baroque music", "the symphony", "film noir", "architecture of cathedrals",
    "modern art", "the novel", "mythology", "fairy tales", "opera", "hip hop", "street food", "coffee",
    "fermentation", "bread baking", "vegetarian diets", "first aid", "dental care", "running shoes",
    "houseplants", "birdwatching", "camping", "cycling in cities", "parenting toddlers", "adopting a pet",
    "moving house", "online privacy", "passwords", "phishing", "artificial intelligence ethics", "robotics",
    "virtual reality", "space tourism", "the International Space Station", "submarines", "airplanes and lift",
]

EXPLAIN = [
    "Explain {s} to a ten-year-old.", "What are the most important things to know about {s}?",
    "Write a short paragraph about {s}.", "Give me five interesting facts about {s}.",
    "Describe {s} in simple terms, then give one example.", "What are the pros and cons of {s}?",
    "What is a common misconception about {s}?", "Compare {s} and {t}.",
    "How would you teach a class about {s}? Give a short lesson plan.", "Why does {s} matter?",
    "Explain {s} using an analogy.", "What would happen if {s} suddenly disappeared?",
    "Summarize the history of {s} in a few sentences.", "What questions do scientists still ask about {s}?",
    "Write a quiz with three questions about {s}, and give the answers.",
    "How has {s} changed over the last hundred years?", "Give a beginner's guide to {s}.",
    "What are the main arguments for and against {s}?", "Describe {s} to someone from the year 1800.",
    "In what ways are {s} and {t} connected?",
    "Write an outline for an essay on {s}.", "What are three good books or resources for learning about {s}?",
    "Give a step-by-step explanation of how {s} works.", "What careers involve {s}?",
    "Write a short dialogue between a student and a teacher about {s}.",
    "What are the ethical questions raised by {s}?", "Describe the future of {s} in 2050.",
    "What would a critic say about {s}, and how would you answer?", "Explain {s} in exactly three sentences.",
    "Write a table comparing {s} and {t} on three points.",
]

FORMS = ["an email", "a formal letter", "a blog post", "a short speech", "a poem", "a short story",
         "a product review", "a cover letter", "a social media post", "a news article", "a haiku",
         "a limerick", "an advertisement", "a dialogue", "a diary entry", "a persuasive essay"]
OCCASIONS = [
    "asking a manager for a day off", "thanking a teacher", "inviting friends to a birthday party",
    "complaining about a late delivery", "announcing a new product", "welcoming new employees",
    "apologizing for missing a meeting", "describing a trip to the mountains", "a rainy afternoon",
    "a robot that learns to paint", "a lost dog finding its way home", "the first day at a new school",
    "a city in the year 2100", "convincing people to recycle", "a small bakery opening",
    "a friendship between a cat and a crow", "a hiking accident", "winning a chess tournament",
    "the benefits of reading every day", "a volunteer cleanup of a beach", "moving to a new country",
    "a scientist discovering a new planet", "an old lighthouse keeper", "a surprise visit from a grandparent",
    "a weekend in a small fishing village", "the launch of a community garden", "a power cut during a storm",
    "a teenager's first job", "a retirement party", "a charity bake sale", "a misunderstanding between neighbours",
    "a train journey across the desert", "an invention that changed a family", "the last day of summer",
]

ROLES = ["a pirate captain", "a detective", "a chef", "an astronaut", "a medieval knight", "a friendly robot",
         "a museum guide", "a sports coach", "a librarian", "a wizard", "a doctor", "a travel agent",
         "a famous inventor", "a stand-up comedian", "a news anchor", "a personal trainer", "a tax advisor",
         "a kindergarten teacher", "a startup founder", "a park ranger"]
ROLE_TASKS = [
    "Pretend to be {r} and introduce yourself.", "You are {r}. Describe your typical day.",
    "As {r}, give advice to someone who feels stuck.", "Write a short speech that {r} might give.",
    "Act as {r} and answer: what is the hardest part of your job?",
    "Stay in character as {r} and explain {s} to me.", "As {r}, recommend three books and say why.",
]

LANGUAGES = ["Python", "JavaScript", "C++", "Java", "Rust", "Go", "C", "TypeScript"]
CODE_TASKS = [
    "checks whether a string is a palindrome", "counts the vowels in a sentence",
    "reverses the words in a sentence", "returns the largest number in a list", "merges two sorted lists",
    "computes the factorial of a number", "finds the n-th Fibonacci number", "removes duplicates from a list",
    "checks whether a number is prime", "counts how often each word appears in a text",
    "converts Celsius to Fahrenheit", "finds the second smallest element of an array",
    "validates an email address", "flattens a nested list", "computes the greatest common divisor",
    "sorts a list of names alphabetically", "reads a file and prints its longest line",
    "implements binary search", "checks whether two strings are anagrams", "returns the median of a list",
    "rotates a matrix by 90 degrees", "finds the longest common prefix of several strings",
]
CODE_TEMPLATES = [
    "Write a {lang} function that {task}.", "In {lang}, how would you write a program that {task}?",
    "Write a {lang} function that {task}, and explain its time complexity.",
    "Here is a task: write code that {task}. Use {lang} and add comments.",
]
CODE_QUESTIONS = [
    "Explain the difference between a list and a tuple in Python.", "What is recursion? Give an example.",
    "Explain what a hash table is and why lookups are fast.", "What does the HTTP status code 404 mean?",
    "Explain the difference between a process and a thread.", "What is a race condition?",
    "Explain what Git branches are used for.", "What is the difference between SQL and NoSQL databases?",
    "Explain big-O notation with examples.", "What is an API?", "How does garbage collection work?",
    "What is the difference between stack and heap memory?", "Explain object-oriented programming.",
    "Write a SQL query that finds the five customers with the most orders.",
    "Explain what a regular expression is and give an example.", "What is dependency injection?",
]

MATH = [
    "A shirt costs ${a} and is {p} percent off. What is the sale price?",
    "A car travels {a} kilometers in {b} hours. What is its average speed?",
    "What is {a} multiplied by {b}? Show your work.", "Solve for x: {b}x + {a} = {c}.",
    "A rectangle is {a} meters long and {b} meters wide. What are its area and perimeter?",
    "If you save ${b} every week, how many weeks does it take to save ${a}?",
    "What is {p} percent of {a}?", "A recipe needs {b} eggs for {a} cookies. How many eggs for {c} cookies?",
    "What is the sum of all integers from 1 to {a}?", "A circle has a radius of {b} cm. What is its area?",
    "Two dice are rolled. What is the probability that the sum is {d}?",
    "Find the next number in the sequence {b}, {b2}, {b3}, {b4}.",
    "A train leaves at {h} o'clock going {a} km/h. How far has it gone after {b} hours?",
    "If {b} workers build a wall in {c} hours, how long would {b2} workers take?",
    "What is the average of {a}, {b}, {c} and {d}?", "Is {c} a prime number? Explain.",
    "Simplify the fraction {b2}/{b4}.", "Convert {a} minutes into hours and minutes.",
]
NAMES = ["Alice", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam"]
REASONING = [
    "{n1} is taller than {n2}, and {n2} is taller than {n3}. Who is the shortest? Explain.",
    "{n1} has {b} apples and gives {n2} {d2} of them. {n2} already had {d}. How many does each have now?",
    "If today is {day}, what day will it be in {c} days?",
    "{n1}, {n2} and {n3} each have a different pet: a cat, a dog and a fish. {n1} does not have the dog, "
    "and {n3} has the fish. Who has which pet?",
    "A farmer has {b} chickens and {d} cows. How many legs are there in total?",
    "{n1} is {b} years older than {n2}. In {d} years {n2} will be {c}. How old is {n1} now?",
    "Is the following argument valid? All birds can fly. Penguins are birds. So penguins can fly.",
    "Which is heavier, a kilogram of feathers or a kilogram of steel? Explain.",
    "{n1} reads {b} pages a day. The book has {a} pages. How many days until {n1} finishes it?",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Lima", "Oslo", "Cairo", "Perth", "Seoul", "Dublin"]
EXTRACTION = [
    "Extract every name and date from this text: \"{n1} met {n2} in {city} on {day} {d} March {y}, and "
    "they visited {city2} a week later.\"",
    "List the numbers mentioned in this sentence: \"The shop sold {a} apples, {b} pears and {c} plums in {d} days.\"",
    "From this text, list the cities: \"After leaving {city}, {n1} flew to {city2} and then took a train to {city3}.\"",
    "Summarize this in one sentence: \"{n1} started a small company in {city} in {y}. It grew to {a} employees "
    "and opened an office in {city2}.\"",
    "Turn this into a JSON object with name, city and age: \"{n1} is {d2} years old and lives in {city}.\"",
    "What is the main idea of this sentence? \"Although it rained for {d} days, the festival in {city} drew "
    "{a} visitors.\"",
]
FOLLOW_UPS = [
    "Also, keep the answer short.", "Please use bullet points.", "Answer in a formal tone.",
    "Explain it like I am a beginner.", "Add an example at the end.", "",
]


def training_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct instructions, the same for the same seed, balanced over the families above."""
    rng = random.Random(seed)

    def numbers() -> dict:
        b = rng.randint(2, 12)
        return {"a": rng.randint(20, 500), "b": b, "c": rng.randint(10, 900), "d": rng.randint(2, 12),
                "d2": rng.randint(1, 9), "p": rng.choice([10, 15, 20, 25, 30, 40, 50]), "h": rng.randint(6, 11),
                "b2": b * 2, "b3": b * 3, "b4": b * 4, "y": rng.randint(1990, 2024)}

    def people() -> dict:
        n = rng.sample(NAMES, 3)
        c = rng.sample(CITIES, 3)
        return {"n1": n[0], "n2": n[1], "n3": n[2], "city": c[0], "city2": c[1], "city3": c[2],
                "day": rng.choice(DAYS)}

    families = [
        lambda: rng.choice(EXPLAIN).format(s=rng.choice(SUBJECTS), t=rng.choice(SUBJECTS)),
        lambda: f"Write {rng.choice(FORMS)} about {rng.choice(OCCASIONS)}.",
        lambda: rng.choice(ROLE_TASKS).format(r=rng.choice(ROLES), s=rng.choice(SUBJECTS)),
        lambda: rng.choice(CODE_TEMPLATES).format(lang=rng.choice(LANGUAGES), task=rng.choice(CODE_TASKS)),
        lambda: rng.choice(CODE_QUESTIONS),
        lambda: rng.choice(MATH).format(**numbers()),
        lambda: rng.choice(REASONING).format(**numbers(), **people()),
        lambda: rng.choice(EXTRACTION).format(**numbers(), **people()),
    ]
    seen, out = set(), []
    for _ in range(count * 50):
        prompt = rng.choice(families)()
        extra = rng.choice(FOLLOW_UPS)
        prompt = f"{prompt} {extra}".strip()
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
            if len(out) == count:
                return out
    raise ValueError(f"only {len(out)} distinct training prompts, asked for {count}")
