"""The master: forms a group (tpi.master.setup), keeps it serving (recovery), and runs sequences on it.

    start_group(GroupOptions(...), on_event=...) -> Group     group.engine.generate(prompt, params, n)
"""
from tpi.master.engine import Engine
from tpi.master.group import Group
from tpi.master.options import EngineOptions, GroupOptions
from tpi.master.setup import build_local_engine, start_group

__all__ = ["Engine", "EngineOptions", "Group", "GroupOptions", "build_local_engine", "start_group"]
