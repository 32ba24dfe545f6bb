"""Census-Income (KDD) from UCI's files, with the task pairs of the MMoE paper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtlkit.data._bundle import DatasetBundle
from mtlkit.data._nyuv2 import require_root
from mtlkit.data._registry import register
from mtlkit.data._tabular import Table, TabularTask, build_tabular, read_table

TRAIN_FILE = "census-income.data"
TEST_FILE = "census-income.test"

#: the 42 columns of census-income.data / .test, in order (UCI's census-income.names)
COLUMNS = (
    "age", "class_of_worker", "industry_code", "occupation_code", "education", "wage_per_hour",
    "enrolled_in_edu_inst_last_wk", "marital_status", "major_industry_code",
    "major_occupation_code", "race", "hispanic_origin", "sex", "member_of_labor_union",
    "reason_for_unemployment", "full_or_part_time_employment_stat", "capital_gains",
    "capital_losses", "dividends_from_stocks", "tax_filer_status",
    "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household",
    "instance_weight", "migration_code_change_in_msa", "migration_code_change_in_reg",
    "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother",
    "country_of_birth_self", "citizenship", "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits", "weeks_worked_in_year",
    "year", "income",
)
NUMERIC = ("age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
           "num_persons_worked_for_employer", "weeks_worked_in_year")
#: education values counted as "at least college" (a bachelor's degree or above)
COLLEGE = ("Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)",
           "Doctorate degree(PhD EdD)", "Prof school degree (MD DDS DVM LLB JD)")
#: task pair -> (task name, source column) of each task
GROUPS = {
    "income_marital": (("income", "income"), ("marital", "marital_status")),
    "education_marital": (("education", "education"), ("marital", "marital_status")),
}


def _labels(table: Table, path: Path) -> Table:
    """Binary label cells "0"/"1" for income > 50K, at least college, never married."""
    out: Table = {}
    for cell in table["income"]:
        if cell not in ("- 50000.", "50000+."):
            raise ValueError(f"census: {path} column 42 (income) holds {cell!r}; expected "
                             "'- 50000.' or '50000+.'")
    out["income"] = ["1" if c == "50000+." else "0" for c in table["income"]]
    out["education"] = ["1" if c in COLLEGE else "0" for c in table["education"]]
    out["marital"] = ["1" if c == "Never married" else "0" for c in table["marital_status"]]
    return out


@register("census")
def census(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    tasks: str = "income_marital",
    embed_dim: int = 4,
    model: str = "tabular_mmoe",
    model_options: dict | None = None,
) -> DatasetBundle:
    """Census-Income (KDD), UCI, with the two task groups of MMoE (Ma et al., KDD 2018).

    Reads ``{root}/census-income.data`` (199,523 rows) and ``{root}/census-income.test``
    (99,762 rows): 42 comma-separated columns, no header (:data:`COLUMNS`). As in the MMoE
    paper's section 5: the task group ``income_marital`` predicts income > 50K and marital
    status "Never married"; ``education_marital`` predicts education at least college
    (:data:`COLLEGE`) and "Never married". The training file is the training split; the test
    file is split at random (seeded) 1:1 into validation and test. The label sources of both
    groups (income, education, marital status) and the instance weight are not features; the
    7 numeric columns
    (:data:`NUMERIC`) are standardised on the training split and the other 33 embedded
    (vocabularies from the training split, code 0 for unseen values).

    Args:
        root: the folder holding the two files.
        seed: seeds the validation / test split of the test file.
        tasks: ``income_marital`` or ``education_marital``.
        embed_dim: embedding size of the default model.
        model: the registered model (the MMoE paper's is ``tabular_mmoe``; ``tabular_mlp``,
            its
            shared-bottom baseline).
        model_options: further options of the model.

    Raises:
        ValueError: an unknown task group, a row without 42 cells, an unexpected label.
        FileNotFoundError: a file is missing.
    """
    path = require_root("census", root)
    if tasks not in GROUPS:
        raise ValueError(f"census: tasks must be one of {sorted(GROUPS)}, got {tasks!r}")
    group = GROUPS[tasks]
    dropped = {"instance_weight", "income", "education", "marital_status"}
    numeric = [c for c in NUMERIC if c not in dropped]
    categorical = [c for c in COLUMNS if c not in dropped and c not in NUMERIC]
    tables = {}
    for name in (TRAIN_FILE, TEST_FILE):
        table = read_table(path / name, COLUMNS, header=COLUMNS, name="census")
        tables[name] = {**{c: table[c] for c in categorical + numeric},
                        **_labels(table, path / name)}
    test = tables[TEST_FILE]
    n = len(test["income"])
    if n < 2:
        raise ValueError(f"census: {path / TEST_FILE} needs 2 rows or more (validation + test)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    half = n // 2
    val_rows, test_rows = np.sort(order[:half]), np.sort(order[half:])
    splits = {
        "train": tables[TRAIN_FILE],
        "val": {c: [v[i] for i in val_rows] for c, v in test.items()},
        "test": {c: [v[i] for i in test_rows] for c, v in test.items()},
    }
    files = {"train": str(path / TRAIN_FILE), "val": str(path / TEST_FILE),
             "test": str(path / TEST_FILE)}
    specs = [TabularTask(name, name, "binary") for name, _ in group]
    return build_tabular(
        "census", splits, files, categorical, numeric, specs, model=model,
        model_options={"embed_dim": embed_dim, **(model_options or {})},
        info={"root": str(path), "tasks": tasks, "seed": seed,
              "source": "UCI Census-Income (KDD); task groups of MMoE (Ma et al., KDD 2018)"},
    )
