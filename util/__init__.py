"""What free-min needs in order to run, below the five files of the method (README: the files)."""
