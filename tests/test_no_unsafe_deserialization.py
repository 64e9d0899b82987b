"""No pickle-based loading anywhere a user's file or a peer's message can reach."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("fedmmkt_core", "plugins", "cli", "examples") for p in (ROOT / d).rglob("*.py")]

FORBIDDEN = {
    "pickle": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib|cloudpickle)\b", re.M),
    "yaml.load without SafeLoader": re.compile(r"yaml\.(load|load_all|unsafe_load|full_load)\s*\((?![^)]*SafeLoader)"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\s*\((?![^)]*weights_only\s*=\s*True)"),
    "numpy.load of object arrays": re.compile(r"np\.load\s*\((?![^)]*allow_pickle\s*=\s*False)"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
}


def test_sources_exist():
    assert len(SOURCES) > 20


def test_no_unsafe_deserialization():
    found = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for what, pattern in FORBIDDEN.items():
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not found, "\n".join(found)


def test_the_scan_catches_what_it_should():
    samples = {
        "pickle": "import pickle\n",
        "yaml.load without SafeLoader": "yaml.load(text)\n",
        "allow_pickle=True": "np.load(f, allow_pickle=True)\n",
        "torch.load without weights_only=True": "torch.load(path)\n",
        "eval/exec": "eval(s)\n",
    }
    for what, text in samples.items():
        assert FORBIDDEN[what].search(text), what
    assert not FORBIDDEN["yaml.load without SafeLoader"].search("yaml.load(text, Loader=yaml.SafeLoader)")
    assert not FORBIDDEN["torch.load without weights_only=True"].search("torch.load(p, weights_only=True)")
