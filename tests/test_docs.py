"""The documentation against the code, so that it cannot drift: every relative link in README.md,
NOTES.md and docs/ resolves to a file inside the repository (and its #anchor to a heading); every
section of docs/PALM_SPEC.md that the code cites exists; the spec's tables list every parameter of
a dense and of a sparse model with its shape and initial scale, every PaLMConfig field with its
default, every preset with its values, the training defaults, and the Hugging Face names."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest

import palmcore
from palmcore import interchange
from palmcore.training import TrainSettings

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "PALM_SPEC.md"
DOCUMENTS = [ROOT / "README.md", ROOT / "NOTES.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)


def prose(text: str) -> str:
    """Markdown without its fenced code blocks and inline code spans (no links live there)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, code marks and punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def headings(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return HEADING.findall(text)


def section(heading: str) -> str:
    """The text of the spec's section ``heading``, up to the next heading of its level or above."""
    text = SPEC.read_text(encoding="utf-8")
    match = re.search(rf"^(#+) {re.escape(heading)}\n", text, re.MULTILINE)
    assert match, f"docs/PALM_SPEC.md has no section {heading!r}"
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{len(match.group(1))}}} ", rest, re.MULTILINE)
    return rest[:end.start()] if end else rest


def table(text: str) -> list[dict[str, str]]:
    """The first Markdown table in ``text``: one dict per row, keyed by the header cells, code marks removed."""
    lines = re.search(r"^\|.*(?:\n\|.*)*", text, re.MULTILINE).group(0).splitlines()
    assert len(lines) >= 3, "no table found"
    cells = [[cell.strip().replace("`", "") for cell in line.strip().strip("|").split("|")] for line in lines]
    header, rows = cells[0], cells[2:]
    return [dict(zip(header, row)) for row in rows]


# --------------------------------------------------------------------------- links and citations

@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(document):
    text = prose(document.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not a file of the repository
            continue
        path, _, fragment = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        assert resolved.is_relative_to(ROOT), f"{document.name}: the link {target} leaves the repository"
        assert resolved.exists(), f"{document.name}: the link {target} names no file"
        if fragment and resolved.suffix == ".md":
            anchors = [anchor(h) for h in headings(resolved)]
            assert fragment in anchors, f"{document.name}: {target}: no such heading in {resolved.name}"


def cited_sections() -> set[tuple[str, str]]:
    """(file, section) for every citation of the spec in the sources: the name PALM_SPEC (or
    PALM_SPEC.md) followed by one or more quoted section names, in parentheses or not."""
    citation = re.compile(r'PALM_SPEC(?:\.md)?,? *\(?((?:"[^"\n]+"(?:, *)?)+)')
    found = set()
    sources = [p for folder in ("python", "csrc", "tests", "bench") for p in (ROOT / folder).rglob("*")
               if p.suffix in (".py", ".cpp", ".h", ".cu", ".inc", ".sh")]
    for path in sources + DOCUMENTS:
        for names in citation.findall(path.read_text(encoding="utf-8", errors="replace")):
            found.update((path.name, name) for name in re.findall(r'"([^"]+)"', names))
    return found


def test_every_cited_section_of_the_spec_exists():
    cited = cited_sections()
    assert len(cited) > 10  # the search finds the citations at all
    sections = set(headings(SPEC))
    missing = sorted(c for c in cited if c[1] not in sections)
    assert not missing, f"sections cited but not in docs/PALM_SPEC.md: {missing}"


# --------------------------------------------------------------------------- parameters

def size(formula: str, symbols: dict[str, int]) -> int:
    """A size written as a product of symbols and numbers: "H·dh", "(H·dh)", "4·D"."""
    return math.prod(int(f) if f.isdigit() else symbols[f] for f in formula.strip("()").split("·"))


def symbols_of(cfg) -> dict[str, int]:
    return {"V": cfg.vocab_size, "D": cfg.d_model, "L": cfg.n_layers, "H": cfg.n_heads, "Hkv": cfg.n_kv_heads,
            "dh": cfg.head_dim, "F": cfg.ffn_dim, "E": cfg.n_experts, "k": cfg.expert_top_k,
            "Fe": cfg.expert_ffn_dim}


def parameter_table() -> dict[str, dict[str, str]]:
    return {row["name"]: row for row in table(section("Parameters"))}


def documented_name(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "layers.{i}.", name)


# every extent different, so that a formula naming the wrong symbol gives the wrong shape
DENSE = palmcore.PaLMConfig(vocab_size=19, d_model=10, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, ffn_dim=14)
SPARSE = dataclasses.replace(DENSE, n_experts=3, expert_top_k=2, expert_ffn_dim=5, moe_every=2)


@pytest.mark.parametrize("cfg", [DENSE, SPARSE], ids=["dense", "sparse"])
def test_every_parameter_is_in_the_table_with_its_shape(cfg):
    documented = parameter_table()
    symbols = symbols_of(cfg)
    state = palmcore.PaLM(cfg, seed=0).state_dict()
    for name, value in state.items():
        row = documented.get(documented_name(name))
        assert row is not None, f"{name} is not in the parameter table of docs/PALM_SPEC.md"
        shape = tuple(size(extent, symbols) for extent in row["shape"].strip("[]").split(", "))
        assert shape == value.shape, f"{name}: the spec says {row['shape']} = {shape}, the model has {value.shape}"


def test_the_parameter_table_lists_only_parameters_there_are():
    names = {documented_name(n) for cfg in (DENSE, SPARSE) for n in palmcore.PaLM(cfg).state_dict()}
    assert set(parameter_table()) == names


def test_initial_values_follow_the_table():
    """Each parameter's spread at seed 0 against the table's std (a formula ``S^-1/2``, or 1, or ones):
    within 10 %, with at least 1,000 values per tensor (the sampling error is about 2 %)."""
    cfg = palmcore.PaLMConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                              ffn_dim=96, n_experts=8, expert_ffn_dim=48, moe_every=2)
    documented = parameter_table()
    symbols = symbols_of(cfg)
    for name, value in palmcore.PaLM(cfg, seed=0).state_dict().items():
        init = documented[documented_name(name)]["initial value"]
        if init == "ones":
            assert np.all(value == 1.0), name
            continue
        std = re.fullmatch(r"normal, std (\S+)", init).group(1)
        expected = 1.0 if std == "1" else size(std.removesuffix("^-1/2"), symbols) ** -0.5
        assert value.size >= 1000 and abs(value.std() / expected - 1) < 0.1, f"{name}: std {value.std()}, spec {init}"


# --------------------------------------------------------------------------- configuration

def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_every_config_field_is_documented_with_its_default():
    documented = {row["field"]: row["default"] for row in table(section("Configuration"))}
    fields = dataclasses.fields(palmcore.PaLMConfig)
    assert set(documented) == {f.name for f in fields}
    for f in fields:
        if f.default is dataclasses.MISSING:
            assert documented[f.name] == "required", f.name
        elif f.default is None:  # derived from other fields: a formula
            assert re.search(r"[A-Z]", documented[f.name]), f.name
        else:
            assert number(documented[f.name]) == f.default, f"{f.name}: the spec says {documented[f.name]}"


def test_derived_defaults_follow_their_formulas():
    documented = {row["field"]: row["default"] for row in table(section("Configuration"))}
    cfg = palmcore.PaLMConfig(vocab_size=19, d_model=12, n_layers=1, n_heads=3)
    assert documented["head_dim"] == "D / H" and cfg.head_dim == 12 // 3
    assert size(documented["ffn_dim"], symbols_of(cfg)) == cfg.ffn_dim
    assert documented["expert_ffn_dim"] == "F" and cfg.expert_ffn_dim == cfg.ffn_dim


PRESET_COLUMNS = {"V": "vocab_size", "D": "d_model", "L": "n_layers", "H": "n_heads", "Hkv": "n_kv_heads",
                  "dh": "head_dim", "F": "ffn_dim", "E": "n_experts", "k": "expert_top_k", "moe_every": "moe_every"}


def test_the_presets_table_matches_the_presets():
    rows = {row["preset"]: row for row in table(section("Presets"))}
    assert list(rows) == palmcore.PaLMConfig.presets()
    for name, row in rows.items():
        cfg = palmcore.PaLMConfig.preset(name)
        for column, field in PRESET_COLUMNS.items():
            if row[column] == "—":  # routing fields of a dense preset
                assert cfg.n_experts == 0, f"{name}: {column} is left blank but the preset is sparse"
            else:
                assert number(row[column]) == getattr(cfg, field), f"{name}: {column} is {row[column]}"


def test_the_training_defaults_table_matches_TrainSettings():
    rows = table(section("Training recipe"))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    assert rows
    for row in rows:
        value = defaults[row["setting"]]
        assert (str(value) == row["default"] if isinstance(value, str) else number(row["default"]) == value), row


# --------------------------------------------------------------------------- interchange

def test_the_interchange_section_names_the_hugging_face_layout():
    text = section("Interchange")
    for name in interchange.name_map(DENSE).values():
        module = re.sub(r"^model\.(layers\.\d+\.)?", "", name).removesuffix(".weight").split(".")[-1]
        assert module in text, f"{name} ({module}) is not in the Interchange section"
    listed = re.search(r"\*\*config\.json\*\*:(.*?)\n- \*\*", text, re.DOTALL).group(1)
    keys = set(re.findall(r"`(\w+)`", listed))
    assert keys and keys <= set(interchange.hf_config(DENSE)), keys - set(interchange.hf_config(DENSE))
