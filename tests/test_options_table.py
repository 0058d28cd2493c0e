"""The README's table of training options is the schema's: every TrainSettings option, its help
and default, as scripts/options_table.py makes it."""

from pathlib import Path

from scripts.options_table import options_table, readme_with_table
from tinv_gui.schema import described_fields, flag_of
from tinv_gui.settings import TrainSettings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_lists_every_training_option_as_the_schema_describes_it():
    readme = README.read_text()
    assert readme_with_table(readme) == readme, "the README's options table is out of date: run python scripts/options_table.py"
    rows = options_table().splitlines()[2:]
    flags = [line.split("|")[1].strip(" `") for line in rows]
    assert flags == [flag_of(f.name, spec) for f, spec, _ in described_fields(TrainSettings)]
    steps = next(row for row in rows if row.startswith("| `--steps`"))
    assert "`3000` (textual-inversion)" in steps and "`--max_train_steps`" in steps
