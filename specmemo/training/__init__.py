"""Training what specmemo ships: the draft head (`specmemo train-draft`)."""
