"""The one OpenVINO `Core` of this process.

Why one: each `ov.Core` loads its own CPU plugin, and the plugin gives every thread that compiles a model an
alternate signal stack of its own, remembering the stack it replaced and putting that back when the plugin
goes away. Two plugins gone in the order they came (an engine's box decoder, then the click decoder it
compiled on the first click) leave the thread's alternate stack pointing at unmapped memory. Python installs
its signal handlers with SA_ONSTACK, so the next SIGINT, SIGTERM or SIGCHLD the thread handles cannot be
delivered and the kernel kills the process with SIGSEGV: Ctrl-C crashed instead of stopping cleanly, and a
DataLoader's exiting worker killed a test process. One Core for the whole process keeps one plugin, whose
stack stays valid until exit. Settings go into each `compile_model` call (nothing is set on the Core), so
callers sharing it cannot change each other's compilations.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import openvino as ov


@cache
def shared_core() -> ov.Core:
    """The process's Core, created on first use and kept until exit."""
    import openvino as ov

    return ov.Core()
