"""Every number a walkthrough or an instructors' key quotes in its prose comes from the
notebook itself.

The rule for notebook authors: a measurement you write in a markdown cell (a count, a
ratio, a loss, a percentage, a size) must appear among the numbers the committed full run
prints (stream text and ``text/plain`` outputs) or in a code cell's source (a config value
like 7168 written in code is a source). Type nothing a cell does not print: when the
package changes, nbval re-executes the ``NBVAL_CHECK_OUTPUT`` cells, and this test then
catches the prose that still quotes the old value.

How a quoted number matches:
- A number with d decimals matches a printed number that rounds to it at d decimals
  (``0.117`` matches ``0.1172``; ``87%`` matches ``87.3%`` and also the fraction ``0.873``).
- A suffix scales: ``11.6B`` matches ``11,610,067,968``, ``2M`` matches ``2,000,000``
  (K, M, B, T; GiB/MiB/KiB and GB/MB/KB as powers of 1024 and 1000); the printed number
  may carry the same suffix instead, or none at all where a table names the unit in its
  header (a column "IB KB" printing 150.5 serves a quoted ``150.5 KB``).
- ``1e-3`` matches a printed number that equals it at the mantissa's precision.

What is not a quoted measurement, and is not checked:
- integers below 10 (counts used as words: "two experts", "top-8"), years, and numbers
  glued to letters (``H800``, ``E4M3``, ``bf16``, ``V3``);
- numbers after "notebook", "cell", "section", "sec.", "eq.", "issue", "arXiv", "Table",
  "Figure" and headings' numbers; link targets (only the link text is read);
- LaTeX: formulas are definitions, so numbers inside ``$...$`` are skipped, except a
  result written after ``\\approx`` (``$\\ln 40 \\approx 3.7$``), which is a quoted value.

Facts from the papers that no cell prints go in ``PAPER_FACTS`` with their source.
A figure's drawing code is not a source: quote what a cell prints next to it.
"""

import math
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
WALKTHROUGHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
KEYS = sorted(NOTEBOOKS.glob("exercises/solutions/key_*.ipynb"))  # worked answers to the prompts
CHECKED = {path.stem: path for path in WALKTHROUGHS + KEYS}
COMMITTED = WALKTHROUGHS + sorted(NOTEBOOKS.glob("exercises/**/*.ipynb"))

# notebook stem -> {quoted text as written: where it comes from}. Keep it short: a fact
# the package can compute belongs in a cell's output instead.
PAPER_FACTS = {
    "01_rmsnorm_rope_yarn": {
        "32K and 128K": "V3 report sec. 4.3 (long-context extension)",
        "16K context": "the exercise's own setting (s = 4 x 4K)",
    },
    "03_deepseekmoe": {"671 billion": "V3 report, abstract"},
    "04_aux_loss_free_balancing": {"std 0.006": "V3 report sec. 4.2"},
    "05_multi_token_prediction": {
        "85–90% of the time": "V3 report sec. 5.4.3", "reports 85–90%": "V3 report sec. 5.4.3",
        "as layer 61": "the released checkpoint's key names (DESIGN.md)",
        "listed as 685B": "the release's model card", "+ 14B MTP": "the release's model card",
        "671B + 11.6B": "the release's model card, and 08's printed count",
        "as the 671B total": "V3 report, abstract",
    },
    "06_train_toy_model": {
        "the 37 plays": "the corpus (data.py assembles 37 plays, the sonnets and 4 poems)",
        "2048 × 9": "the released config (DESIGN.md): moe_intermediate_size x (N_s + K_r)",
        "the usual 0.999": "Adam's default beta_2 (Kingma and Ba 2015)",
        "instead of 1,000": "1 / (1 - 0.999), the averaging horizon of beta_2 = 0.999",
        "58 × 256": "the released config: 58 MoE layers x 256 routed experts",
        "runs 540 s": "the Makefile's TRAIN_SECONDS", "--time-budget 540": "the Makefile",
        "defaults to 1,500": "train_cli.py's --steps default",
        "(37B of 671B": "V3 report, abstract",
        "about 128K tokens": "V3 report sec. 4.1 (tokenizer)",
        "3,072 to 15,360": "V3 report sec. 4.2", "first 469B": "V3 report sec. 4.2",
        "for 14.3T of the 14.8T": "V3 report sec. 4.2",
        "width of 7,168": "the released config's hidden_size",
        "moe_intermediate_size=48": "the exercise's own setting",
        "n_routed_experts=16": "the exercise's own setting",
        "about 235,000 steps": "14.8T tokens / 62.9M tokens per step, both printed above",
    },
    "08_scale_to_671b": {
        "standard deviation 0.006": "V3 report sec. 4.2",
        'its "685B" label': "the release's model card",
        '(the "685B" counts': "the release's model card",
        "within 0.25% of": "V3 report sec. 3.3",
        "uses 16-way pipeline": "V3 report sec. 3.2", "64-way expert": "V3 report sec. 3.2",
    },
    "09_scale_out": {"cut to 400 GB/s": "DeepSeek, Insights into DeepSeek-V3 (ISCA 2025) sec. 4.1, "
                                        "as scale_out.py cites it"},
    "10_fp8_training": {"Appendix B.1, about 1T": "V3 report, appendix B.1",
                        "at 16B and 230B": "V3 report, appendix B.1",
                        "below 0.25 % for": "V3 report sec. 3.3 and appendix B.1"},
    "key_01_rmsnorm_rope_yarn": {"16K context": "the walkthrough's prompt (s = 4 x 4K)"},
    "key_04_aux_loss_free_balancing": {"last 500B tokens": "V3 report sec. 4.2",
                                       "after 14.3T": "V3 report sec. 4.2"},
    "key_05_multi_token_prediction": {"report's = 0.0001": "V3 report sec. 4.2 (alpha)"},
    "key_06_train_toy_model": {"last 500B tokens": "V3 report sec. 4.2"},
    "key_09_scale_out": {"an 80 GB H800": "the H800's memory (V3 report sec. 3.1)",
                         "at 160 GB/s": "V3 report sec. 3.2.2 (NVLink)"},
    "07_generate_and_speculate": {
        "trains for 540 s": "the Makefile's TRAIN_SECONDS", "--time-budget 540": "the Makefile",
        "160-wide latent": "d_c + d_R = 128 + 32 of the attention config, in the formula above",
        "the 96-wide key": "d_h of the attention config, in the formula above",
        "code to 671B": "the title of notebook 08",
    },
}

SCALE = {"K": 1e3, "k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12,
         "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30, "TiB": 2.0**40,
         "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
_NUMBER = (r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
           r"(?:[eE](?P<exp>[-+]?\d+))?")
_SUFFIX = r"(?:\s?(?P<suf>%|×|x\b|[KMGT]i?B\b|[KkMBT]\b))?"
QUOTED = re.compile(r"(?<![\w.,^_\-/])" + _NUMBER + _SUFFIX + r"(?![\w^])")
PRINTED = re.compile(r"(?<![\d.])" + _NUMBER + _SUFFIX)
NOT_A_MEASUREMENT = re.compile(
    r"(?:notebooks?|cells?|sections?|sec\.|§|eq\.|equations?|issues?|arXiv:?|tables?|"
    r"figures?|fig\.|step|steps)\s*$", re.IGNORECASE)


def _value(m):
    try:
        return float(m["num"].replace(",", "")) * 10.0 ** int(m["exp"] or 0)
    except OverflowError:  # a printed 1e400 is no measurement anyone quotes
        return math.inf


def _decimals(m):
    return len(m["num"].split(".")[1]) if "." in m["num"] else 0


def printed_numbers(nb):
    """(value, suffix) of every number the committed outputs print or the code sources hold."""
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        texts.append(re.sub(r"(?<=\d)_(?=\d)", "", cell.source))  # 20_000 is 20000
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                texts.append(out.get("data", {}).get("text/plain", ""))
    found = set()
    for text in texts:
        for m in PRINTED.finditer(text):
            found.add((_value(m), m["suf"] or ""))
    return found


def prose(source):
    """The markdown a reader reads as running text: link text kept, targets, HTML tags,
    headings and formulas dropped (except the value after \\approx in a formula)."""
    text = source.replace("\\$", " USD ")
    text = re.sub(r"\]\([^)]*\)", "]", text)  # [text](target) -> [text]
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"https?://\S+", " ", text)
    text = re.sub(r"^#+ .*$", " ", text, flags=re.MULTILINE)

    def keep_approx(formula):
        tail = re.findall(r"\\approx\s*([\d.,]+)", formula.group())
        return " " + " ".join(tail) + " "

    text = re.sub(r"\$\$.*?\$\$", keep_approx, text, flags=re.DOTALL)
    return re.sub(r"\$[^$]*\$", keep_approx, text)


def quoted_numbers(source):
    """(match, suffix, a few words of context) for every quoted measurement in a markdown
    cell. The first number of a range takes the range's suffix: "68–78%" quotes 68% and 78%."""
    text = prose(source)
    for m in QUOTED.finditer(text):
        suffix = m["suf"]
        if suffix is None and text[m.end():m.end() + 1] in ("–", "-"):
            after = QUOTED.match(text, m.end() + 1)
            suffix = after["suf"] if after else None
        value, before = _value(m), text[:m.start()]
        small = value < 10 and "." not in m["num"] and not m["exp"]
        if small and suffix not in SCALE and suffix != "%":
            continue
        if "." not in m["num"] and not suffix and 1900 <= value <= 2100:
            continue  # a year
        if NOT_A_MEASUREMENT.search(before[-20:]):
            continue
        context = " ".join(text[max(0, m.start() - 40):m.end() + 20].split())
        yield m, suffix or "", context


def _rounds_to(x, target, decimals):
    return abs(round(x, decimals) - target) < 0.5 * 10.0 ** -(decimals + 3)


def matches(m, printed, suffix=None):
    target, decimals = _value(m), _decimals(m)
    suffix = (m["suf"] or "") if suffix is None else suffix
    if m["exp"]:  # 1e-3: equal at the mantissa's precision
        rel = 0.5 * 10.0 ** -decimals / max(abs(float(m["num"].replace(",", ""))), 1e-30)
        return any(math.isclose(x, target, rel_tol=rel) for x, _ in printed)
    for x, printed_suffix in printed:
        if printed_suffix == suffix and _rounds_to(x, target, decimals):
            return True
        if suffix in SCALE and not printed_suffix and _rounds_to(x / SCALE[suffix],
                                                                 target, decimals):
            return True
        if suffix == "%" and not printed_suffix and _rounds_to(100 * x, target, decimals):
            return True
        if suffix in ("×", "x") and printed_suffix in ("×", "x", "") and _rounds_to(
                x, target, decimals):
            return True
        if not suffix and printed_suffix in SCALE and _rounds_to(
                x * SCALE[printed_suffix], target, decimals):
            return True
        if suffix in SCALE and not printed_suffix and _rounds_to(x, target, decimals):
            return True  # a table that names the unit in its header ("IB KB") prints 150.5
    return False


def unmatched(path):
    nb = nbformat.read(path, as_version=4)
    printed = printed_numbers(nb)
    allowed = PAPER_FACTS.get(path.stem, {})
    checked, missing = 0, []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        for m, suffix, context in quoted_numbers(cell.source):
            if any(fact in context for fact in allowed):
                continue
            checked += 1
            if not matches(m, printed, suffix):
                missing.append(f"cell {index}: {m.group().strip()!r} in '...{context}...'")
    return checked, missing


@pytest.mark.parametrize("path", CHECKED.values(), ids=CHECKED)
def test_every_number_the_prose_quotes_is_printed_by_the_notebook(path):
    checked, missing = unmatched(path)
    assert checked > 0, f"{path.name}: no quoted number found; is the parser broken?"
    assert not missing, (f"{path.name}: {len(missing)} of {checked} quoted numbers appear "
                         "in no output or code cell (print them, or cite the paper in "
                         "PAPER_FACTS):\n" + "\n".join(missing))


@pytest.mark.parametrize("stem", sorted(PAPER_FACTS))
def test_every_cited_fact_is_still_quoted_by_its_notebook(stem):
    # an entry whose prose has been reworded must leave the list
    path = CHECKED[stem]
    contexts = [context for cell in nbformat.read(path, as_version=4).cells
                if cell.cell_type == "markdown" for _, _, context in quoted_numbers(cell.source)]
    stale = [fact for fact in PAPER_FACTS[stem]
             if not any(fact in context for context in contexts)]
    assert not stale, f"{stem}: no quoted number's context holds {stale}; remove them"


@pytest.mark.parametrize("fact", ["11.6B", "87%", "3.2×", "2M", "0.117", "1e-3", "74.5 GiB"])
def test_the_matching_rounds_a_quoted_number_from_what_is_printed(fact):
    printed = {(11_610_067_968.0, ""), (0.873, ""), (3.21, "×"), (2_000_000.0, ""),
               (0.11716, ""), (0.001, ""), (74.5, "GiB")}
    (m, suffix, _), = quoted_numbers(f"we quote {fact} here")
    assert matches(m, printed, suffix)
    assert not matches(m, {(1234.5, "")})


def test_a_table_with_the_unit_in_its_header_serves_a_quoted_size():
    (m, suffix, _), = quoted_numbers("dispatch sends 150.5 KB per token")
    assert matches(m, {(150.5, "")}, suffix)
    assert not matches(m, {(150.4, ""), (150.5, "GB")}, suffix)


def test_definitions_links_and_section_numbers_are_not_quoted_numbers():
    text = ("See [notebook 04](04_x.ipynb#sec-12) and cell 17; $m = 0.1 \\ln s + 1$ with "
            "$\\ln 40 \\approx 3.7$, the H800 in 2024, top-8 of 256 experts.")
    assert [m.group().strip() for m, _, _ in quoted_numbers(text)] == ["3.7", "256"]


def test_the_first_number_of_a_range_takes_the_range_suffix():
    (low, low_suffix, _), (high, high_suffix, _) = quoted_numbers("accepted 68–78% of drafts")
    assert (low_suffix, high_suffix) == ("%", "%")
    assert matches(low, {(0.68, "")}, low_suffix) and not matches(low, {(68.5, "")}, low_suffix)


MACHINE_PATHS = re.compile(r"/work/|/home/|/tmp/|/Users/|/root/|[A-Za-z]:\\\\|[A-Za-z]:\\")


@pytest.mark.parametrize("path", COMMITTED, ids=[str(p.relative_to(NOTEBOOKS)) for p in COMMITTED])
def test_no_committed_output_prints_an_absolute_path_of_this_machine(path):
    nb = nbformat.read(path, as_version=4)
    offenders = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = out.get("text", "") + "".join(
                v for k, v in out.get("data", {}).items() if k.startswith("text/")) + \
                "".join(out.get("traceback", []))
            for m in MACHINE_PATHS.finditer(text):
                offenders.append(f"cell {index}: ...{text[max(0, m.start() - 30):m.end() + 40]}...")
    assert not offenders, f"{path.name} prints absolute paths:\n" + "\n".join(offenders)
