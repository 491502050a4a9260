from specmemo.cli import main

main()
