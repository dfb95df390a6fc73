"""A grid point is a value: hashable, equal whatever the order of its keys, read back from results.csv as written."""

from __future__ import annotations

from hf_relearn.storage import read_results, write_results
from hf_relearn.study.grid import GridPoint, grid_of


def test_a_grid_point_groups_rows_whatever_the_order_of_its_keys(tmp_path):
    a, b = GridPoint({"n_layer": 4, "n_embd": 64}), GridPoint({"n_embd": 64, "n_layer": 4})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a == {"n_embd": 64, "n_layer": 4} and {"n_embd": 64, "n_layer": 4} == a
    assert a != GridPoint({"n_layer": 8, "n_embd": 64}) and a != {"n_layer": 4}
    assert a.label() == b.label() == "n_embd=64, n_layer=4" and GridPoint().label() == "base"
    # written as a study writes it (the recipe's order), read back as the report reads it
    rows = [{"run_id": "r0", "grid": a.to_json()}, {"run_id": "r1", "grid": b.to_json()}]
    write_results(tmp_path / "results.csv", rows, ["run_id", "grid"])
    back = read_results(tmp_path / "results.csv")
    assert [grid_of(r) for r in back] == [a, a] and list(grid_of(back[0])) == ["n_layer", "n_embd"]
    assert grid_of(a.to_json()) == grid_of({"n_embd": 64, "n_layer": 4}) == grid_of(a) == a
    assert grid_of({"grid": None}) == GridPoint() == grid_of("")
