"""The package's shape, checked from its source (docs/ARCHITECTURE.md draws it): layers whose imports point
down only, no import cycle, and imports at module top except where they defer a heavy optional stack."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

LAYERS: list[tuple[str, ...]] = [
    # bottom: no qmedsam imports beyond this row
    ("qmedsam.version", "qmedsam.errors", "qmedsam.files", "qmedsam.typed_config"),
    # the case contract and preprocessing; scans (NIfTI, DICOM, boxes, windows); scores of arrays and files
    ("qmedsam.data",),
    ("qmedsam.scans", "qmedsam.evaluate.surface", "qmedsam.evaluate.metrics", "qmedsam.evaluate.interaction"),
    ("qmedsam.model",),
    ("qmedsam.inference",),
    # the training dataset SDK and the recipes that build trees from package registries
    ("qmedsam.datasets",),
    (
        "qmedsam.export",
        "qmedsam.train",
        "qmedsam.evaluate.report",
        "qmedsam.evaluate.click_protocol",
        "qmedsam.evaluate.from_slice_protocol",
    ),
    # one way to load an engine (builds -m fp32 through export), and the benchmarks on top of it
    ("qmedsam.engines", "qmedsam.benchmark"),
    # cohorts: many inputs through the one-input jobs, here or on Ray
    ("qmedsam.cohort",),
    ("qmedsam.segmenter",),
    # faces
    ("qmedsam.napari", "qmedsam.serve", "qmedsam.commands", "qmedsam.cli", "qmedsam.__main__", "qmedsam"),
]

HEAVY_STACKS = frozenset(
    [
        "torch",
        "brevitas",
        "nncf",
        "onnx",
        "onnxscript",
        "onnxoptimizer",
        "monai",
        "openvino",
        "napari",
        "qtpy",
        "PyQt5",
        "matplotlib",
        "nibabel",
        "pydicom",
        "highdicom",
        "tifffile",
        "ray",
        "fastapi",
        "uvicorn",
        "nnInteractive",
        "blosc2",
    ]
)
"""Third-party stacks that take seconds or hundreds of MB to import, or are optional extras: the only reason an
import may sit inside a function."""


def module_files() -> dict[str, Path]:
    files = {}
    for path in (SRC / "qmedsam").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()


@cache
def imports_of(module: str) -> tuple[tuple[str, bool], ...]:
    """(imported module, inside a function?) for every import statement of `module`."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        lazy = node.col_offset > 0 if isinstance(node, ast.Import | ast.ImportFrom) else False
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.append((child if child in MODULES else node.module, lazy))
        elif isinstance(node, ast.Import):
            found += [(alias.name, lazy) for alias in node.names]
    return tuple(found)


def own_imports(module: str) -> set[str]:
    return {name for name, _ in imports_of(module) if name in MODULES and name != module}


def layer_of(module: str) -> int:
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} is in no layer of LAYERS; add it where it belongs"
    return best


@cache
def is_heavy(module: str) -> bool:
    """Whether importing `module` imports a heavy stack (its own top-level imports, followed through qmedsam)."""
    for name, lazy in imports_of(module):
        if lazy:
            continue
        if name.split(".")[0] in HEAVY_STACKS or (name in MODULES and name != module and is_heavy(name)):
            return True
    return False


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_point_down():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module in MODULES
        for target in own_imports(module)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    # Tarjan's strongly connected components over every import, lazy or not
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in own_imports(module):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert not cycles, cycles


def test_function_level_imports_only_defer_heavy_stacks():
    # the package's face imports Segmenter lazily (PEP 562) so that `import qmedsam` stays cheap
    allowed = {("qmedsam", "qmedsam.segmenter")}
    needless = [
        f"{module}: import of {name} inside a function"
        for module in MODULES
        for name, lazy in imports_of(module)
        if lazy
        and (module, name) not in allowed
        and name.split(".")[0] not in HEAVY_STACKS
        and not (name in MODULES and is_heavy(name))
        and name.split(".")[0] == "qmedsam"
    ]
    assert not needless, "\n".join(needless)


def test_the_checks_see_what_they_check():
    """The checker itself: it finds the package's modules, their lazy imports and a heavy module."""
    assert {"qmedsam.inference.runtime", "qmedsam.export.fp32", "qmedsam.files"} <= set(MODULES)
    assert ("qmedsam.segmenter", True) in imports_of("qmedsam")
    assert is_heavy("qmedsam.model.litemedsam") and not is_heavy("qmedsam.files")


def core_constructions(module: str) -> list[int]:
    """Lines of `module` that construct an OpenVINO Core (`ov.Core()`, `openvino.Core()`, `Core()`)."""
    lines = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name == "Core":
                lines.append(node.lineno)
    return lines


def test_the_process_has_one_openvino_core():
    """Every Core comes from `qmedsam.inference.ov_core.shared_core` (its docstring: a second Core's CPU plugin
    left the thread's alternate signal stack unmapped, and the next Ctrl-C killed the process with SIGSEGV)."""
    made = {module: lines for module in MODULES if (lines := core_constructions(module))}
    assert (
        made == {"qmedsam.inference.ov_core": made.get("qmedsam.inference.ov_core")}
        and made["qmedsam.inference.ov_core"]
    )
