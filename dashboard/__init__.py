"""The people's side of the loop: a live fleet dashboard in the terminal and ``har confirm``."""
