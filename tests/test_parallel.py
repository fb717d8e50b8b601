"""Sharding chains over devices, the masked (padded) log density and the batch fit.

The multi-device checks run in a subprocess with four virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before JAX is
imported) and in float64, where the sharded and single-device runs agree to rounding (in
float32 a rounding difference can flip a NUTS decision; see clusterhbm.parallel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterhbm.grid import band_indices, load_grid
from clusterhbm.model import ModelConfig, Priors, StarData, log_density, pop_to_unconstrained
from clusterhbm.parallel import (
    chain_sharding,
    fit_many,
    masked_log_density,
    pad_star_data,
    pad_star_positions,
)
from clusterhbm.simulate import ClusterParams, simulate_cluster

_SHARDED_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from clusterhbm.parallel import chain_sharding
    from clusterhbm.sampling import run_nuts

    scales = jnp.array([1.0, 2.0, 0.5])

    def logdensity(p):
        return -0.5 * jnp.sum((p["x"] / scales) ** 2) - 0.5 * (p["y"] - 1.0) ** 2

    init = {"x": jnp.full((4, 3), 0.3), "y": jnp.zeros(4)}
    kw = dict(num_warmup=30, num_samples=20, chunk_size=30, max_num_doublings=5)
    one = run_nuts(jax.random.key(3), logdensity, init, **kw)
    sharding = chain_sharding(4)
    four = run_nuts(jax.random.key(3), logdensity, init, sharding=sharding, **kw)
    try:
        chain_sharding(6)
        uneven = "no error"
    except ValueError as exc:
        uneven = str(exc)

    # batch mode: 4 problems (different scales) x 2 chains, problems split over devices
    from jax.sharding import NamedSharding, PartitionSpec
    from clusterhbm.parallel import CLUSTER_AXIS, device_mesh, run_nuts_batch

    def ld_batch(p, scale):
        return -0.5 * jnp.sum((p["x"] / scale) ** 2)

    batch_scales = jnp.array([[1.0, 1.0], [3.0, 1.0], [0.3, 1.0], [1.0, 10.0]])
    init_b = {"x": jnp.full((4, 2, 2), 0.1)}
    kwb = dict(num_warmup=40, num_samples=40, chunk_size=40, max_num_doublings=5)
    b1 = run_nuts_batch(jax.random.key(5), ld_batch, batch_scales, init_b, **kwb)
    sh = NamedSharding(device_mesh(axis_name=CLUSTER_AXIS), PartitionSpec(CLUSTER_AXIS))
    b4 = run_nuts_batch(jax.random.key(5), ld_batch, batch_scales, init_b, sharding=sh,
                        **kwb)
    xb = b1.samples["position"]["x"]  # (K, C, S, 2)

    out = {
        "n_devices": len(jax.devices()),
        "mesh_devices": int(sharding.mesh.devices.size),
        "max_abs_diff": max(float(np.max(np.abs(one.samples["position"][k]
                                                - four.samples["position"][k])))
                            for k in ("x", "y")),
        "max_step_size_diff": float(np.max(np.abs(one.step_size - four.step_size))),
        "same_steps": bool(np.array_equal(one.info["num_integration_steps"],
                                          four.info["num_integration_steps"])),
        "draws_shape": list(four.samples["position"]["x"].shape),
        "sd_y": float(np.std(one.samples["position"]["y"])),
        "uneven": uneven,
        "batch_shape": list(xb.shape),
        "batch_max_abs_diff": float(np.max(np.abs(xb - b4.samples["position"]["x"]))),
        "batch_sd": np.std(xb, axis=(1, 2)).tolist(),
    }
    print("RESULT" + json.dumps(out))
""")


def test_sharded_chains_equal_single_device_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    assert res["n_devices"] == 4 and res["mesh_devices"] == 4
    assert res["draws_shape"] == [4, 20, 3]
    # same keys -> same draws (to float64 rounding), same trajectory lengths
    assert res["same_steps"]
    assert res["max_abs_diff"] < 1e-8
    assert res["max_step_size_diff"] < 1e-10
    assert 0.2 < res["sd_y"] < 3.0  # it did sample something (target sd 1)
    assert "cannot be split evenly over 4 devices" in res["uneven"]
    # batch mode sharded over problems: same draws, and each problem has its own target
    assert res["batch_shape"] == [4, 2, 40, 2]
    assert res["batch_max_abs_diff"] < 1e-8
    sd = np.asarray(res["batch_sd"])  # (K, 2) sample sd per problem and coordinate
    assert sd[1, 0] > sd[0, 0] > sd[2, 0] and sd[3, 1] > 2 * sd[3, 0]


def test_chain_sharding_single_device():
    sh = chain_sharding(3, devices=jax.devices()[:1])
    assert sh.mesh.devices.size == 1
    with pytest.raises(ValueError, match="positive multiple"):
        chain_sharding(0, devices=jax.devices()[:1])


# --------------------------------------------------------------------------- masked model


@pytest.fixture(scope="module")
def mock():
    from clusterhbm.fit import prepare_data

    grid = load_grid()
    sim = simulate_cluster(ClusterParams(log_age=9.6), n_stars=20, seed=5, grid=grid)
    fd = prepare_data(sim.catalogue)
    config = ModelConfig(band_idx=band_indices(fd.bands), fit_widths=(True,) * 4)
    pop_vals = {"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1,
                "sigma_log_age": 0.01, "sigma_feh": 0.01, "sigma_distance_pc": 4.0,
                "sigma_av_mag": 0.01}
    pop = pop_to_unconstrained(pop_vals, config)
    t = sim.truth[fd.rows]
    n = len(t)
    rng = np.random.default_rng(0)
    star = {"s": jnp.asarray(np.asarray(t["mass_msun"]) + 3e-3 * np.asarray(t["eep"]),
                             jnp.float32)}
    for k in ("z_age", "z_feh", "z_dist", "z_av"):
        star[k] = jnp.asarray(0.3 * rng.standard_normal(n), jnp.float32)
    return {"sim": sim, "grid": grid, "config": config, "priors": Priors(),
            "data": StarData(*fd.data), "position": {"pop": pop, "star": star}, "n": n}


def test_masked_padded_cluster_matches_unpadded(mock):
    grid, config, priors = mock["grid"], mock["config"], mock["priors"]
    data, pos, n = mock["data"], mock["position"], mock["n"]
    n_pad = n + 7
    pdata, mask = pad_star_data(data, n_pad)
    assert pdata.mag.shape == (n_pad, 3) and int(mask.sum()) == n
    pstar = pad_star_positions(pos["star"], n_pad)
    rng = np.random.default_rng(1)
    pstar = {k: v.at[n:].set(jnp.asarray(rng.standard_normal(n_pad - n), v.dtype))
             for k, v in pstar.items()}
    ppos = {"pop": pos["pop"], "star": pstar}

    def unpadded(p):
        return log_density(p, data, grid, config, priors)

    def padded(p):
        return masked_log_density(p, pdata, mask, grid, config, priors)

    vg_padded = jax.jit(jax.value_and_grad(padded))
    lp0, g0 = jax.jit(jax.value_and_grad(unpadded))(pos)
    lp1, g1 = vg_padded(ppos)
    assert np.isfinite(float(lp0))
    const = -0.5 * sum(float(jnp.sum(v[n:] ** 2)) for v in pstar.values())
    np.testing.assert_allclose(float(lp1), float(lp0) + const, rtol=1e-6)
    for k in g0["pop"]:
        np.testing.assert_allclose(np.asarray(g1["pop"][k]), np.asarray(g0["pop"][k]),
                                   rtol=1e-4, atol=1e-3, err_msg=k)
    for k in g0["star"]:
        np.testing.assert_allclose(np.asarray(g1["star"][k][:n]), np.asarray(g0["star"][k]),
                                   rtol=1e-4, atol=1e-3, err_msg=k)
        # padded stars: only their own standard normal
        np.testing.assert_allclose(np.asarray(g1["star"][k][n:]), -np.asarray(pstar[k][n:]),
                                   rtol=1e-6)
    # moving a padded star's coordinates changes nothing but its N(0, 1) term
    moved = {"pop": ppos["pop"], "star": {**pstar, "s": pstar["s"].at[n:].set(0.0)}}
    const2 = const + 0.5 * float(jnp.sum(pstar["s"][n:] ** 2))
    np.testing.assert_allclose(float(vg_padded(moved)[0]), float(lp0) + const2, rtol=1e-6)


def test_fit_many_two_clusters(mock):
    grid = mock["grid"]
    sim_b = simulate_cluster(ClusterParams(log_age=9.3, distance_pc=600.0), n_stars=12,
                             seed=7, grid=grid)
    cats = [mock["sim"].catalogue[:16], sim_b.catalogue]
    # full starting values: the initial-guess scan has a single point (compile time)
    inits = [{"log_age": 9.6, "feh": 0.0, "distance_pc": 850.0, "av_mag": 0.1},
             {"log_age": 9.3, "feh": 0.0, "distance_pc": 600.0, "av_mag": 0.1}]
    res = fit_many(cats, num_chains=2, num_warmup=10, num_samples=10, chunk_size=10,
                   max_num_doublings=4, optimise_steps=5, grid=grid, inits=inits, seed=2,
                   dense_mass_matrix=False)
    assert len(res) == 2
    for r, n, age in zip(res, (16, 12), (9.6, 9.3)):
        assert r.population["log_age"].shape == (2, 10)
        assert r.sampler["step_size"].shape == (2,)
        assert r.stars["eep"].shape[-1] == n
        assert r.source_id.shape == (n,)
        assert r.settings["batch"]["pad_to"] == 16
        assert np.all(np.isfinite(r.sampler["logdensity"]))
        # short run: only check that each cluster stays near its own age
        assert abs(float(np.mean(r.population["log_age"])) - age) < 0.1
