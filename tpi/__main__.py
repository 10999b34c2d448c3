"""`python -m tpi` is the `tpi` command (local workers are started this way)."""
from tpi.cli import entry

entry(prog_name="tpi")
