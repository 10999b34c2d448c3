"""`python -m tpi` is the `tpi` command (local workers start lighter: tpi.cli.local_worker)."""
from tpi.cli import entry

entry(prog_name="tpi")
