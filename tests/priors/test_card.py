

def test_quality_section_is_replaced_in_place_and_idempotently(tmp_path) -> None:
    from magic3d.priors.card import EVALUATOR_MARKER, fill_quality_section

    card = tmp_path / "README.md"
    card.write_text(f"# card\n\n## Quality\n\n{EVALUATOR_MARKER}\nTo be filled.\n\n## Verification\n\n- ok\n")
    assert fill_quality_section(card, "| a |\n|---|\n| 1 |")
    assert fill_quality_section(card, "| a |\n|---|\n| 2 |")  # a second evaluation replaces the first
    text = card.read_text()
    assert "| 2 |" in text and "| 1 |" not in text and "To be filled" not in text
    assert text.endswith("## Verification\n\n- ok\n")
    plain = tmp_path / "plain.md"
    plain.write_text("# no marker\n")
    assert not fill_quality_section(plain, "x") and plain.read_text() == "# no marker\n"
