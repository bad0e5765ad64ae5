"""The prepare CLI and the build library (data/build/build.py): --verify reports (counts, problems, exit codes), a build
through main(), and the dataset table (data/build/registry.py)."""

from __future__ import annotations

import pytest

from data_fixtures import make_nih_tree, make_tb_tree
from metachex_jax import prepare
from metachex_jax.data.build import build, builders, registry


def test_verify_clean_synthetic_copy_reports_counts_but_passes(tmp_path, capsys):
    tree = make_nih_tree(tmp_path / "ChestX-ray14", n_patients=12)
    assert prepare.main(["--dataset=chestxray14", f"--manual_dir={tmp_path}", "--verify", "--workers=2"]) == 0
    out = capsys.readouterr().out
    assert f"images: 112,120 expected, {len(tree.rows)} found (a subset or synthetic copy; not an error)" in out
    assert f"test: 25,596 expected, {len(tree.test)} found" in out
    assert "patient-disjoint" in out and "implausible ages (kept, age_valid=False): 1" in out
    assert "OK: no problems" in out
    # The same copy claimed complete fails.
    report = build.verify_raw("chestxray14", tmp_path, strict_counts=True, check_images=False)
    assert {p.item for p in report.problems} == {"images", "patients", "train_val", "test"}


def test_verify_lists_every_problem_including_bad_images_and_exits_1(tmp_path, capsys):
    tree = make_nih_tree(tmp_path, n_patients=8)
    tree.rows[0]["labels"] = "Cardiomegally"
    tree.rows[2]["sex"] = "female"
    tree.write_csv()
    truncated = tree.image_path(tree.rows[4]["name"])
    truncated.write_bytes(truncated.read_bytes()[:30])
    (tmp_path / "images" / "55555555_000.png").write_bytes(truncated.read_bytes())  # unlisted
    assert prepare.main(["--dataset=chestxray14", f"--manual_dir={tmp_path}", "--verify", "--workers=2"]) == 1
    out = capsys.readouterr().out
    for line in (f"[unknown_label] {tree.rows[0]['name']}:", f"[bad_sex] {tree.rows[2]['name']}:",
                 f"[undecodable_image] {tree.rows[4]['name']}:", "[unlisted_image] images/55555555_000.png:"):
        assert line in out
    assert "4 problem(s)" in out


def test_verify_more_images_than_published_is_a_problem(tmp_path):
    make_tb_tree(tmp_path, "montgomery", n_normal=81, n_tb=2, size=8)  # 81 normals > the published 80
    report = build.verify_raw("montgomery", tmp_path, check_images=False)
    assert [(p.kind, p.item) for p in report.problems] == [("count_mismatch", "normal")]
    assert "images: 138 expected, 83 found (a subset or synthetic copy; not an error)" in report.notes


@pytest.mark.parametrize("dataset", ["shenzhen", "montgomery"])
def test_verify_tb_reports_disagreement_and_flags(tmp_path, dataset):
    tree = make_tb_tree(tmp_path, dataset)
    tb_id = sorted(i for i in tree.values if i.endswith("_1"))[0]
    header = "\n".join(tree.readings[tb_id].splitlines()[:-1])
    tree.write_reading(tb_id, header + "\nnormal\n")
    tree.reading_path(sorted(tree.values)[0]).unlink()
    report = build.verify_raw(dataset, tmp_path, num_workers=1, progress=False)
    assert [(p.kind, p.item) for p in report.problems] == [("label_disagreement", tb_id)]
    assert f"flagged missing_reading: 1 ({sorted(tree.values)[0]})" in report.notes
    assert "default split: train" in report.format() and "10 folds" in report.format()


def test_main_builds_and_prints_the_read_call(tmp_path, capsys):
    make_tb_tree(tmp_path / "raw", "shenzhen", n_normal=6, n_tb=6)
    argv = ["--dataset=shenzhen", f"--manual_dir={tmp_path / 'raw'}", f"--data_dir={tmp_path / 'out'}",
            "--resolution=16", "--num_folds=3", "--workers=2"]
    assert prepare.main(argv) == 0
    out = capsys.readouterr().out
    assert "shenzhen/r16_k3_seed0: built at" in out
    assert f'builders.data_source("shenzhen", "train", "{tmp_path / "out"}", config_name="r16_k3_seed0")' in out
    assert "skipped: 0" in out
    assert prepare.main(argv) == 0 and "already built" in capsys.readouterr().out
    first = builders.dataset_dir(tmp_path / "out", "shenzhen", "r16_k3_seed0")
    assert prepare.main(argv + ["--overwrite"]) == 0
    assert "r16_k3_seed0: built at" in capsys.readouterr().out
    version_dir = tmp_path / "out" / "shenzhen" / "r16_k3_seed0" / str(builders.Shenzhen.VERSION)
    rebuilt = builders.dataset_dir(tmp_path / "out", "shenzhen", "r16_k3_seed0")
    assert rebuilt != first and sorted(p.name for p in version_dir.iterdir()) == [rebuilt.name, "dataset_info.json"]


def test_main_reports_raw_problems_and_exits_1(tmp_path, capsys):
    tree = make_tb_tree(tmp_path, "shenzhen", n_normal=4, n_tb=4)
    tb_id = sorted(tree.values)[-1]
    tree.write_reading(tb_id, "male 30yrs\nnormal\n")
    assert prepare.main(["--dataset=shenzhen", f"--manual_dir={tmp_path}", f"--data_dir={tmp_path / 'out'}"]) == 1
    assert f"[label_disagreement] {tb_id}:" in capsys.readouterr().err
    assert not builders.is_complete(tmp_path / "out", "shenzhen", "r256")


def test_the_dataset_table_drives_prepare_and_names_builds(tmp_path, capsys):
    assert set(registry.DATASETS) == {"chestxray14", "shenzhen", "montgomery", "chexpert", "padchest", "csv", "mimic",
                                      "tbx11k", "vindr"}
    assert registry.family("chestxray14").config_name(224, val_fraction=0.05, seed=3) == "r224_val0p05_seed3"
    assert registry.family("montgomery").config_name(256) == "r256"
    assert registry.family("shenzhen").config(256) == builders.tb_config(256)
    assert registry.family("montgomery").config_name(256, geometry="crop_resize") == "r256_square"
    with pytest.raises(ValueError, match=r"shenzhen takes no build parameter\(s\) \['val_fraction'\]"):
        build.build_dataset("shenzhen", tmp_path, tmp_path / "out", val_fraction=0.2)
    with pytest.raises(ValueError, match="unknown dataset 'openi'"):
        build.verify_raw("openi", tmp_path)
    with pytest.raises(SystemExit):
        prepare.main(["--dataset=openi", f"--manual_dir={tmp_path}", "--verify"])
    assert "invalid choice: 'openi'" in capsys.readouterr().err
