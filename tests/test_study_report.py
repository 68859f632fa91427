"""The study's report.html is its report.md rendered: tables, emphasis and images survive, raw HTML does not."""

from rank1.driver.study.report_interpretability import _md_table, html_page, stage_time


def test_report_markdown_renders_as_html_with_tables_bold_and_escaped_text():
    md = "\n".join([
        "# rank1 study", "",
        *_md_table("Concepts", ["feature", "lr", "top token"], [["latent 3", "**0.001** (validation 0.003: 19 %)", "a|b"],
                                                                 ["latent 7", "3e-05", "<script>alert(1)</script>"]]),
        "- rank1-grpo over its SFT start: -1.0 points", "",
        "![accuracy](accuracy.png)",
    ])
    page = html_page(md, "rank1 study")
    assert page.count("<table>") == 1 and page.count("<tr>") == 3
    assert page.count("<td>") == 6 and "<td>a|b</td>" in page  # the "|" inside a cell stayed in it
    assert "<td><strong>0.001</strong> (validation 0.003: 19 %)</td>" in page and "**" not in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<li>rank1-grpo over its SFT start: -1.0 points</li>" in page
    assert '<img src="accuracy.png" alt="accuracy"' in page
    assert page.startswith("<!doctype html>") and "<title>rank1 study</title>" in page


def test_the_interpretability_stages_total_is_stated():
    line = stage_time({"capture-sft": 90.0, "sae-sft": 480.0, "analyze-sft": 30.0, "ablate-sft": 120.0})
    assert line == "Interpretability compute: 12.0 min over 4 stages (slowest: sae-sft 8.0 min, ablate-sft 2.0 min, capture-sft 1.5 min)"
