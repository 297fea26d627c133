"""Repository layout: library code never imports a script, no source file outgrows ~600 lines,
and a flag shared by two scripts means the same thing in both (same dest, same kind of value)."""
import argparse
import ast
import importlib
from pathlib import Path

import pytest

import utils

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_repae", "train_ldm_only", "train_stage1", "generate", "cache_latents", "save_vae_weights",
           "preprocessing", "linear_probe", "demo")
LIBRARY_PACKAGES = ("models", "loss", "utils", "datasources", "evaluation", "configs_compat", "sampling")
LIBRARY_MODULES = ("samplers.py", "transport.py")
MAX_LINES = 600


def imported_modules(path: Path) -> set:
    """Top-level names of every module `path` imports (absolute imports, at any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_script_or_library_module_imports_a_script():
    """Scripts run one another as processes (demo.py -> train_repae.py), never in-process; shared
    code lives in the packages. bench/ and tests/ are harnesses that drive the scripts in-process."""
    files = [ROOT / f"{s}.py" for s in SCRIPTS] + [ROOT / m for m in LIBRARY_MODULES]
    files += [p for pkg in LIBRARY_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 60  # the packages were found
    bad = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & set(SCRIPTS)) for p in files}
    assert not {k: v for k, v in bad.items() if v}


def test_no_source_file_exceeds_the_line_limit():
    sources = [p for p in ROOT.rglob("*.py") if not {".venv", "tests", ".git"} & set(p.relative_to(ROOT).parts)]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job (limit {MAX_LINES} lines): {long}"


# A flag of two scripts with a different dest or kind, each with the reason it must differ.
# Keys: (option string, script).
ALLOWED_DIFFERENCES = {
    # linear_probe.py: random weights of whatever model it probes (an encoder as often as a
    # tokenizer); elsewhere --random-init is the tokenizer's alias of --random-init-vae.
    ("--random-init", "linear_probe"): "random weights of the probed model, encoder or tokenizer",
    # the same meaning under REPA-E's name: generate.py's seed is --global-seed, --seed its alias
    ("--seed", "generate"): "dest global_seed: REPA-E's --global-seed is the main name",
}
# Validators that only narrow an int's range produce the same kind of value as int.
VALUE_KIND = {utils.positive_int: int, utils.non_negative_int: int}


class _Built(Exception):
    pass


def script_parser(module) -> argparse.ArgumentParser:
    """The script's parser: build_parser() where it has one, else the parser its parse_args()
    builds, caught before it parses anything (the module is imported before the patch, so a
    script that binds the function by name keeps the real one)."""
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def capture(parser, argv=None):
        raise _Built(parser)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, "parse_args_with_config", capture)
        with pytest.raises(_Built) as e:
            module.parse_args([])
    return e.value.args[0]


def flag_kind(action: argparse.Action) -> tuple:
    return action.dest, VALUE_KIND.get(action.type, action.type), type(action).__name__, action.nargs


def test_a_flag_shared_by_two_scripts_means_the_same_thing():
    modules = {name: importlib.import_module(name) for name in SCRIPTS}
    seen = {}  # option string -> {script: kind}
    for name, module in modules.items():
        for action in script_parser(module)._actions:
            for option in action.option_strings:
                seen.setdefault(option, {})[name] = flag_kind(action)
    assert {"--batch-size", "--per-proc-batch-size", "--vae-ckpt"} <= {o for o, s in seen.items() if len(s) > 1}
    conflicts = []
    for option, kinds in seen.items():
        usual = max(set(kinds.values()), key=list(kinds.values()).count)
        conflicts += [f"{option}: {name} {kind} vs {usual}" for name, kind in kinds.items()
                      if kind != usual and (option, name) not in ALLOWED_DIFFERENCES]
    assert not conflicts
    stale = [k for k in ALLOWED_DIFFERENCES if k[1] not in seen.get(k[0], {})]
    assert not stale, f"allow-list entries for flags that no longer exist: {stale}"
