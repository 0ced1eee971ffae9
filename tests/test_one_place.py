"""A model's settings are read and defaulted in one place (`diffmem.models.defaults`), and the page and the CLI
that both read them there give the same mitigated image.

The source check reads every module with `ast`: outside `diffmem/models/defaults.py` no module names diffmem.json,
touches `pipe.diffmem_defaults`, uses the old default constants or resolvers, gives a guidance scale, target loss,
SAIL or detection threshold a hard-coded number, reads one of them with a fallback (`.get("target_loss", 3.0)`),
or calibrates a threshold itself (`calibrate_threshold(` outside `detectors/calibration.py`, `measures/` and the
`diffmem evaluate` command).
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HOME = "diffmem/models/defaults.py"
SETTINGS = ("guidance", "target_loss", "sail_threshold", "detection_threshold")
"""A name containing one of these holds a model setting."""
KEYS = ("guidance_scale", "target_loss", "sail_threshold", "detection_threshold")
OLD_NAMES = {"DEFAULT_TARGET_LOSS", "SAIL_THRESHOLD", "SD_GUIDANCE_SCALE", "FAMILY_GUIDANCE", "DEFAULTS_FILE",
             "WEN_TARGET_LOSS", "read_model_defaults", "model_guidance", "default_guidance"}
"""The defaults' constants (home: defaults.py) and the resolvers it replaced: no other module names them."""
OLD_FUNCTIONS = {"resolve_guidance", "resolve_target_loss", "resolve_sail_threshold"}
"""Free functions of the old resolvers; the `ModelDefaults` methods of the same names are attributes."""
CALIBRATES = ("diffmem/detectors/calibration.py", "diffmem/measures/")
EVALUATE = ("diffmem/cli/detection.py", "evaluate")
CHOSEN = {("diffmem/testbed/recipe.py", "guidance_scale")}
"""Settings a module chooses for a model it builds and saves as that model's own (the recipe: the testbed's)."""


def _number(node: ast.AST | None) -> bool:
    """A literal number (or a tuple/list of them): what a hard-coded default looks like."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, int | float) and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp):
        return _number(node.operand)
    if isinstance(node, ast.Tuple | ast.List):
        return bool(node.elts) and all(_number(e) for e in node.elts)
    return False


def _setting(name: str | None) -> bool:
    return name is not None and any(s in name.lower() for s in SETTINGS)


def _target(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def violations(source: str, module: str) -> list[str]:
    """What in `source` (the file `module`, relative to src/) reads or defaults a model setting outside its home."""
    if module == HOME:
        return []
    found: list[str] = []
    tree = ast.parse(source)
    functions = {id(n): f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                 for n in ast.walk(f)}  # innermost wins: ast.walk visits outer functions first

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{module}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value == "diffmem.json" or node.value.endswith("/diffmem.json"):
                flag(node, "names diffmem.json")
            if node.value == "diffmem_defaults":
                flag(node, "touches pipe.diffmem_defaults")
        elif isinstance(node, ast.Attribute) and node.attr == "diffmem_defaults":
            flag(node, "touches pipe.diffmem_defaults")
        if isinstance(node, ast.Name) and node.id in OLD_NAMES | OLD_FUNCTIONS:
            flag(node, f"uses {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in OLD_NAMES:
            flag(node, f"uses {node.attr}")
        elif isinstance(node, ast.alias) and node.name in OLD_NAMES | OLD_FUNCTIONS:
            flag(node, f"imports {node.name}")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in OLD_NAMES | OLD_FUNCTIONS:
            flag(node, f"defines {node.name}")
        if isinstance(node, ast.Call):
            func = _target(node.func)
            key = node.args[0] if node.args else None
            if (func == "get" and isinstance(key, ast.Constant) and key.value in KEYS
                    and (len(node.args) > 1 or node.keywords)):
                flag(node, f'reads {key.value} with a fallback (.get("{key.value}", ...))')
            if func == "calibrate_threshold" and not module.startswith(CALIBRATES) and (
                    (module, functions.get(id(node))) != EVALUATE):
                flag(node, "calibrates a detection threshold itself (use detectors.calibration)")
            for kw in node.keywords:
                if _setting(kw.arg) and _number(kw.value) and (module, kw.arg) not in CHOSEN:
                    flag(kw.value, f"hard-codes {kw.arg}")
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for name in map(_target, targets):
                if _setting(name) and _number(node.value) and (module, name) not in CHOSEN:
                    flag(node, f"hard-codes {name}")
        elif isinstance(node, ast.arguments):
            params = node.posonlyargs + node.args
            pairs = list(zip(params[len(params) - len(node.defaults):], node.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                if _setting(arg.arg) and _number(default):
                    flag(default, f"hard-codes the default of {arg.arg}")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and isinstance(k.value, str) and _setting(k.value) and _number(v):
                    flag(v, f"hard-codes {k.value}")
    return found


def _modules() -> dict[str, Path]:
    return {str(p.relative_to(SRC)): p for p in sorted((SRC / "diffmem").rglob("*.py"))}


def test_only_the_defaults_module_reads_or_defaults_a_models_settings() -> None:
    found = [v for module, path in _modules().items() for v in violations(path.read_text(), module)]
    assert not found, "\n".join(found)


OLD = {
    "reads diffmem.json": 'path = Path(source) / "diffmem.json"',
    "a constant of the home": "from diffmem.models.loading import DEFAULTS_FILE",
    "the attached dict": 'own = getattr(pipe, "diffmem_defaults", {}).get("target_loss")',
    "its attribute": "x = pipe.diffmem_defaults",
    "a fallback": 'return float(cfg.get("target_loss", DEFAULT_TARGET_LOSS))',
    "a numeric fallback": 'g = row.get("guidance_scale", 7.5)',
    "an old resolver": "guidance = resolve_guidance(pipe, guidance)",
    "an old import": "from diffmem.mitigate import resolve_target_loss",
    "a keyword": "pipe(prompt, guidance_scale=7.5)",
    "a parameter default": "def report(pipe, also_guidance=(7.5,)):\n    pass",
    "a keyword-only default": "def run(pipe, *, target_loss: float = 3.0):\n    pass",
    "an assignment": "SDXL_GUIDANCE = 5.0",
    "a dict value": 'settings = {"sail_threshold": 8.2}',
    "a calibration": "threshold = calibrate_threshold(scores, 0.01)",
    "a module constant": "from diffmem.mitigate.sail import SAIL_THRESHOLD",
}


@pytest.mark.parametrize("snippet", OLD.values(), ids=OLD.keys())
def test_the_check_catches_each_old_pattern(snippet: str) -> None:
    assert violations(snippet, "diffmem/app/service.py")
    assert not violations(snippet, HOME)


def test_the_check_lets_the_new_patterns_pass() -> None:
    new = """
from diffmem.models.defaults import ModelDefaults

def run(pipe, guidance_scale: float | None = None, target_loss: float | None = None, steps: int = 50):
    defaults = ModelDefaults.of(pipe)
    guidance = defaults.resolve_guidance(guidance_scale)
    target = defaults.resolve_target_loss(target_loss)
    kept = options.get("sail_threshold")
    return pipe(prompt, guidance_scale=guidance, num_inference_steps=steps, lr=0.05), dict(target_loss=target)
"""
    assert violations(new, "diffmem/app/service.py") == []
    evaluate = "def evaluate(pos, neg):\n    return calibrate_threshold(neg, 0.01)\n"
    assert violations(evaluate, "diffmem/cli/detection.py") == []
    assert violations(evaluate, "diffmem/cli/generation.py")
    assert violations("t = calibrate_threshold(s, 0.01)", "diffmem/measures/detection.py") == []


# ------------------------------------------------------------------------------------- the page and the CLI


@pytest.fixture(scope="module")
def own_target_dir(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD folder with its own target loss, below its prompts' scores (so the optimisation runs)."""
    folder = tmp_path_factory.mktemp("own-target") / "model"
    shutil.copytree(model_dirs["sd1"], folder)
    (folder / "diffmem.json").write_text(json.dumps({"target_loss": 0.3}))
    return folder


@pytest.mark.parametrize("kind", ["family target", "own target"])
def test_the_page_and_the_cli_give_the_same_mitigated_image(kind: str, model_dirs: dict[str, Path],
                                                            own_target_dir: Path, tmp_path: Path, cli) -> None:
    """`generate_pair` and `diffmem mitigate --method embedding-delayed` (the default mitigation) with the same
    prompt, seed, steps and model give the same pixels, both stopping at the slack times the model's target loss.
    The page's threshold (0.1) is below every score of the tiny model: were it still the page's fallback target,
    the page would optimise where the CLI stops at once."""
    from PIL import Image

    from diffmem.app.service import Service, Settings, Threshold
    from diffmem.mitigate.embedding_delayed import SLACK
    from diffmem.models.defaults import ModelDefaults
    from diffmem.models.loading import load_pipeline
    from diffmem.registry import DEFAULT_MITIGATION

    model = model_dirs["sd1"] if kind == "family target" else own_target_dir
    prompt, seed, steps, iters = "a red circle on a blue square", 3, 4, 3
    pipe = load_pipeline(model, device="cpu")
    service = Service(pipe, str(model), Threshold(0.1, "test"),
                      Settings(seed=seed, num_inference_steps=steps, generate_steps=steps, mitigate_iters=iters))
    page = service.generate_pair(prompt)
    prompts = tmp_path / "p.txt"
    prompts.write_text(prompt + "\n")
    res = cli("mitigate", "--method", DEFAULT_MITIGATION, "--model", model, "--prompts", prompts,
              "--out", tmp_path / "out", "--seed", seed, "--num-inference-steps", steps, "--iters", iters,
              "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    row = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    target = ModelDefaults.for_model(model).target_loss
    assert target == (3.0 if kind == "family target" else 0.3)
    assert row["target_loss"] == target and page["mitigation"]["target_loss"] == pytest.approx(target * SLACK)
    assert page["mitigation"]["method"] == row["method"] == "embedding-delayed"
    assert page["mitigation"]["guidance_from_step"] == row["details"]["guidance_from_step"][0] > 0
    assert page["mitigation"]["iters"] == row["iters"] and (row["iters"] == 0) == (kind == "family target")
    cli_pixels = np.asarray(Image.open(tmp_path / "out" / row["images"][0]).convert("RGB"))
    page_pixels = (np.clip(page["mitigated"], 0, 1) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(page_pixels, cli_pixels)
