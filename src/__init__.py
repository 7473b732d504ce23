import sys

# While `python -m src.<command>` looks for its module, sys.argv[0] is "-m": a command is starting (a
# program that imports the package keeps its own excepthook).
if sys.argv[:1] == ["-m"]:
    from src.errors import ctrl_c_while_starting_says_one_line
    ctrl_c_while_starting_says_one_line()
