"""The command line: each subcommand's main([...]) at tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clusterhbm.cli import main


@pytest.fixture(scope="module")
def mock_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "mock.ecsv"
    rc = main(["simulate", "--n-stars", "40", "--binary-fraction", "0.3", "--field-fraction",
               "0.1", "--seed", "0", "-o", str(path)])
    assert rc == 0 and path.exists()
    return path


def test_simulate_writes_catalogue_with_truth(mock_file):
    from clusterhbm.simulate import read_simulation

    sim = read_simulation(mock_file)
    assert len(sim.catalogue) == 40
    assert np.isclose(sim.params.f_bin, 0.3)


def test_fit_summary_plot(mock_file, tmp_path, capsys):
    out = tmp_path / "fit.h5"
    rc = main(["fit", str(mock_file), "--chains", "1", "--warmup", "20", "--samples", "20",
               "--no-widths", "--no-progress", "--colour-correction", "gaia-ms",
               "-o", str(out)])
    assert rc == 0 and out.exists()
    assert "log_age" in capsys.readouterr().out
    from clusterhbm.results import load_results

    cc = load_results(out).settings["colour_correction"]
    assert cc["name"] == "gaia-ms" and len(cc["sha256"]) == 64 and "m67" not in cc["calibrators"]
    rc = main(["summary", str(out), "--json"])
    js = json.loads(capsys.readouterr().out)
    assert rc == 0 and js["n_stars"] == 40 and "distance_pc" in js["parameters"]
    rc = main(["plot", str(out), "--catalogue", str(mock_file), "-o", str(tmp_path / "fig")])
    assert rc == 0
    for name in ("corner", "trace", "cmd", "parallax"):
        assert (tmp_path / "fig" / f"{name}.png").stat().st_size > 1000
        assert (tmp_path / "fig" / f"{name}.pdf").stat().st_size > 1000


def test_cmd_figure_axis_inverted_and_labelled(mock_file):
    from clusterhbm.plots import plot_cmd
    from clusterhbm.simulate import read_simulation

    sim = read_simulation(mock_file)
    fig = plot_cmd(sim.catalogue, truth=sim.truth)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo > hi  # bright at the top
    assert "G" in ax.get_ylabel() and "RP" in ax.get_xlabel()


def test_bad_input_exit_codes(tmp_path, capsys, mock_file):
    assert main(["simulate", "--feh", "3", "-o", str(tmp_path / "x.ecsv")]) == 1
    assert "outside the grid" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("source_id,phot_g_mean_mag\n1,12.0\n")
    assert main(["fit", str(bad), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "phot_bp_mean_mag" in err and "missing" in err
    assert main(["summary", str(tmp_path / "nope.h5")]) == 1
    capsys.readouterr()
    assert main(["fit", str(mock_file), "--no-progress", "--colour-correction", "nope"]) == 1
    assert "not a bundled name" in capsys.readouterr().err
    assert main([]) == 1


def test_priors_from_toml(tmp_path):
    """The --priors file: values override the defaults; bad names and values are named."""
    from clusterhbm.fit import priors_from_toml
    from clusterhbm.model import Priors

    good = tmp_path / "p.toml"
    good.write_text("[priors]\nfeh_sd = 0.2\nmag_floor = 0.02\nf_bin_a = 2\n")
    pr = priors_from_toml(good)
    assert pr.feh_sd == 0.2 and pr.mag_floor == 0.02 and pr.f_bin_a == 2.0
    assert pr.feh_mean == Priors().feh_mean
    bad = tmp_path / "bad.toml"
    bad.write_text("[priors]\nfeh_sigma = 0.2\n")
    with pytest.raises(ValueError, match="feh_sigma"):
        priors_from_toml(bad)
    bad.write_text("[priors]\nfeh_sd = 'small'\n")
    with pytest.raises(ValueError, match="feh_sd must be a number"):
        priors_from_toml(bad)
    bad.write_text("[priors\nfeh_sd = 0.2\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        priors_from_toml(bad)
    # the example shipped in docs/ parses
    example = Path(__file__).resolve().parents[1] / "docs" / "priors_example.toml"
    assert priors_from_toml(example).feh_sd == 0.2
    # and the CLI reports a bad file as exit code 1, one line
    assert main(["fit", "nonexistent.ecsv", "--priors", str(bad)]) == 1


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's first command, at tiny settings: mock, pooled and unpooled fits, figures.
    The unpooled fit optimises 5 starts: its multi-start log line once needed a population
    age the unpooled model does not have (KeyError 'log_age', which broke the demo)."""
    out = tmp_path / "demo"
    rc = main(["demo", "-o", str(out), "--n-stars", "30", "--chains", "1", "--warmup", "30",
               "--samples", "30", "--no-progress", "--quick"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "log_age" in text and "shrinkage: median per-star mass interval" in text
    for name in ("mock.ecsv", "fit.h5", "fit_unpooled.h5"):
        assert (out / name).stat().st_size > 1000
    for name in ("cmd", "corner", "shrinkage", "parallax", "trace"):
        assert (out / f"{name}.png").stat().st_size > 1000
    from clusterhbm.results import load_results

    assert load_results(out / "fit.h5").stars["mass_msun"].shape[-1] == 30
