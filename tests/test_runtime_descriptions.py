"""Runtime descriptions (infinigen_sim/runtimes/): loading and its one-line errors, and what each schedule,
host cost, memory kind, gather style, per-layer budget and kernel style does to the replay (exact event
logs from a stub cost model: seconds per op and per copy whatever the sizes)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from conftest import StubCosts, replay_prefill, replay_step, stub_scenario
from test_bad_input import cli, one_line_exit_2

from infinigen_sim.sim import simulate
from infinigen_sim.spec.hardware import load_hardware
from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.ops import Op
from infinigen_sim.spec.policies import PolicyName, fetch_tokens, h2o_kept, make_policy
from infinigen_sim.spec.runtime import (
    DEFAULT_RUNTIME,
    RuntimeConfigError,
    all_runtime_paths,
    load_runtime,
    runtime_from_raw,
)
from infinigen_sim.spec.work import FUSED, op_work
from infinigen_sim.sweep.grid import Point
from infinigen_sim.sweep.point import scenario_for


def runtime(**sections):
    """A description with only `sections` given (every other key at its default: no host cost)."""
    return runtime_from_raw({"name": "t", **sections}, "test.yaml", "t")


# ---- loading -------------------------------------------------------------------------------------
def test_shipped_descriptions_load_and_round_trip():
    names = [p.stem for p in all_runtime_paths()]
    assert {"infinigen-sim", "infinigen-artifact"} <= set(names) and DEFAULT_RUNTIME in names
    for name in names:
        spec = load_runtime(name)
        again = runtime_from_raw(spec.to_dict(), "round trip", name)
        assert again == spec
        for policy in PolicyName:
            assert again.for_policy(policy) == spec.for_policy(policy)


def test_artifact_overrides_apply_per_policy():
    art = load_runtime("infinigen-artifact")
    assert art.decode.fetch_issue == "after_attention" and art.decode.layer_sync
    assert art.for_policy("flexgen").decode.fetch_issue == "own_layer"
    assert art.for_policy("flexgen").memory.pageable_copy == "direct" and art.memory.pageable_copy == "relay"
    assert art.for_policy("h2o").decode.speculation_sync == "none"
    assert art.for_policy("infinigen").kernels.decode_kv_passes == 1 and art.kernels.decode_kv_passes == 0


def test_a_description_inherits_from_its_base(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: infinigen-artifact  # a shipped one, by name\n"
                                        "name: mine\nhost: {dispatch_us: 9}\n")
    mine, art = load_runtime(tmp_path / "mine.yaml"), load_runtime("infinigen-artifact")
    assert mine.host.dispatch_us == 9 and mine.host.syncs_per_layer == art.host.syncs_per_layer
    assert mine.decode == art.decode and mine.for_policy("flexgen").decode == art.for_policy("flexgen").decode


@pytest.mark.parametrize(("text", "needles"), [
    ("decode: {fetch_issue: sideways}\n", ("decode.fetch_issue", "layer_start, after_attention, own_layer",
                                           "'sideways'")),
    ("decode: {fetch_overlap: 3}\n", ("decode.fetch_overlap",)),
    ("decode: {layer_sync: maybe}\n", ("decode.layer_sync",)),
    ("host: {dispatch_us: -1}\n", ("host.dispatch_us", "non-negative")),
    ("host: {dispatch_us: 1e9}\n", ("host.dispatch_us", "plausible range")),
    ("host: {ops_per_layer: {infinigen: many}}\n", ("host.ops_per_layer.infinigen",)),
    ("host: {ops_per_layer: {sparse: 3}}\n", ("host.ops_per_layer", "sparse")),
    ("gather: {row_ns: .nan}\n", ("gather.row_ns",)),
    ("kernels: {dequant_bytes_per_element: 0}\n", ("kernels.dequant_bytes_per_element",)),
    ("schedule: {}\n", ("unknown key 'schedule'",)),
    ("decode: [layer_start]\n", ("key 'decode'", "expected a mapping")),
    ("decode: {fetch_issue: own_layer}\ndecode: {}\n", ("duplicate key 'decode'",)),
    ("by_policy: {sparse: {}}\n", ("by_policy", "sparse")),
    ("by_policy: {h2o: {decode: {fetch_issue: up}}}\n", ("by_policy.h2o.decode.fetch_issue",)),
    ("by_policy: {h2o: {schedule: {}}}\n", ("by_policy.h2o",)),
    ("base: nowhere\n", ("key 'base'", "'nowhere'", "known there: infinigen-artifact")),
    ("- a\n- b\n", ("expected a mapping",)),
])
def test_bad_runtime_yaml_is_one_line(tmp_path, text, needles):
    path = tmp_path / "rt.yaml"
    path.write_text(text)
    with pytest.raises(RuntimeConfigError) as exc:
        load_runtime(path)
    message = str(exc.value)
    assert "\n" not in message and len(message) <= 300 + len(str(path)), message
    for needle in needles:
        assert needle in message, (needle, message)
    one_line_exit_2(cli("infinigen_sim.sweep", "a100_pcie4", "--runtime", str(path), "--models", "opt-13b",
                        "--out", str(tmp_path / "out")), "--runtime")
    assert not (tmp_path / "out").exists()


def test_a_base_cycle_and_an_unknown_name_are_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(RuntimeConfigError, match="circular base chain"):
        load_runtime(tmp_path / "a.yaml")
    with pytest.raises(RuntimeConfigError, match="known in .*infinigen-artifact"):
        load_runtime("no-such-runtime")


@pytest.mark.parametrize("module,args", [
    ("infinigen_sim.plan", ["--model", "opt-13b", "--prompt-len", "128", "--gen-len", "4",
                            "--target-tokens-per-s", "1", "a100_pcie4"]),
    ("infinigen_sim.report", ["a100_pcie4"]),
])
def test_plan_and_report_take_runtime(tmp_path, module, args):
    one_line_exit_2(cli(module, *args, "--runtime", "no-such-runtime", "--out", str(tmp_path / "o")),
                    "--runtime", "no-such-runtime")


# ---- decode schedules ----------------------------------------------------------------------------
PER_LAYER = StubCosts({"qkv": 1, "attention": 1, "ffn": 2}, h2d=2)


def two_layers(costs=PER_LAYER, policy="flexgen", **sections):
    return replace(stub_scenario(costs, policy, n_layers=2), runtime=runtime(**sections))


def test_after_attention_with_mlp_overlap_hides_the_fetch_behind_the_mlp_only():
    """Layer 1's fetch starts when attention 0 ends and must land before layer 1 starts (a sync ends
    each layer): 2 + 4 + 4 = 10 s, against 9 s when it only has to land before attention 1."""
    log, end = replay_step(two_layers(decode={"fetch_issue": "after_attention", "fetch_overlap": "mlp"}))
    assert log == [
        ("h2d_link h2d:kv[0] start", 0.0), ("h2d_link h2d:kv[0] end", 2.0), ("gpu qkv[0] start", 2.0),
        ("gpu qkv[0] end", 3.0), ("gpu attention[0] start", 3.0), ("gpu attention[0] end", 4.0),
        ("gpu ffn[0] start", 4.0), ("h2d_link h2d:kv[1] start", 4.0), ("gpu ffn[0] end", 6.0),
        ("h2d_link h2d:kv[1] end", 6.0), ("gpu qkv[1] start", 6.0), ("gpu qkv[1] end", 7.0),
        ("gpu attention[1] start", 7.0), ("gpu attention[1] end", 8.0), ("gpu ffn[1] start", 8.0),
        ("gpu ffn[1] end", 10.0)]
    assert end == 10.0
    assert replay_step(two_layers(decode={"fetch_issue": "after_attention"}))[1] == 9.0
    assert replay_step(two_layers())[1] == 9.0  # layer_start: kv[1] waits only for the link


def test_own_layer_without_overlap_serialises_load_and_compute():
    log, end = replay_step(two_layers(decode={"fetch_issue": "own_layer", "fetch_overlap": "none"}))
    assert [e for e in log if "h2d" in e[0]] == [
        ("h2d_link h2d:kv[0] start", 0.0), ("h2d_link h2d:kv[0] end", 2.0),
        ("h2d_link h2d:kv[1] start", 6.0), ("h2d_link h2d:kv[1] end", 8.0)]
    assert end == 12.0  # 2 x (2 copy + 4 compute)


def test_sync_fetch_layers_load_before_their_own_compute():
    log, end = replay_step(two_layers(decode={"sync_fetch_layers": 1}))
    assert log[:4] == [("h2d_link h2d:kv[0] start", 0.0), ("h2d_link h2d:kv[0] end", 2.0),
                       ("gpu qkv[0] start", 2.0), ("h2d_link h2d:kv[1] start", 2.0)]
    assert end == 10.0


def test_host_dispatch_gates_each_layer_and_runs_ahead_without_syncs():
    costs = replace(PER_LAYER, dispatch=0.5)
    log, end = replay_step(two_layers(costs))
    assert [e for e in log if e[0].startswith("dispatch")] == [
        ("dispatch dispatch[0] start", 0.0), ("dispatch dispatch[0] end", 0.5),
        ("dispatch dispatch[1] start", 0.5), ("dispatch dispatch[1] end", 1.0)]
    assert ("gpu qkv[0] start", 0.5) in log and end == 9.0  # only layer 0's dispatch is exposed


def test_a_layer_sync_exposes_every_layers_dispatch():
    log, end = replay_step(two_layers(replace(PER_LAYER, dispatch=0.5), decode={"layer_sync": True}))
    assert ("gpu ffn[0] end", 5.0) in log and ("dispatch dispatch[1] start", 5.0) in log
    assert ("gpu qkv[1] start", 5.5) in log and end == 9.5


SPECULATED = StubCosts({"qkv": 1, "attention": 1, "ffn": 1, "speculate": 1}, h2d=2, gather=1, dispatch=0.5)


def speculated(**sections):
    return replace(stub_scenario(SPECULATED, "infinigen", n_layers=2, full_fetch_layers=1),
                   runtime=runtime(**sections))


def test_a_host_synchronous_speculation_holds_the_next_dispatch():
    log, end = replay_step(speculated(decode={"speculation_sync": "host"}))
    assert ("dispatch dispatch[1] start", 4.5) in log and end == 8.0
    assert replay_step(speculated())[1] == 7.5  # queued speculation: layer 1 was dispatched at 0.5-1.0


def test_a_main_thread_gather_runs_on_the_dispatching_thread():
    log, _ = replay_step(speculated(gather={"thread": "main"}))
    assert ("dispatch gather[1] start", 1.5) in log and ("dispatch gather[1] end", 2.5) in log
    assert not any(e.startswith("host_cpu") for e, _ in log)
    assert ("gpu attention[0] start", 2.5) in log  # the ops after the gather are dispatched after it
    log, _ = replay_step(speculated())
    assert ("host_cpu gather[1] start", 1.5) in log


def test_a_gather_via_a_temporary_adds_a_host_copy():
    costs = replace(SPECULATED, memcpy=0.25)
    plain = replay_step(replace(speculated(), costs=costs))[0]
    relayed = replay_step(replace(speculated(gather={"via_temporary": True}), costs=costs))[0]
    times = dict(relayed)
    assert times["host_cpu commit:staging[1] start"] == times["host_cpu gather[1] end"]
    assert times["host_cpu commit:staging[1] end"] - times["host_cpu commit:staging[1] start"] == 0.25
    assert not any("staging" in label for label, _ in plain)


def test_pageable_host_kv_makes_the_copy_block_the_host():
    log, end = replay_step(two_layers(replace(PER_LAYER, dispatch=0.5), memory={"host_kv": "pageable"}))
    assert ("h2d_link h2d:kv[0] start", 0.5) in log and ("dispatch dispatch[1] start", 2.5) in log
    assert ("h2d_link h2d:kv[1] start", 3.0) in log and end == 9.5
    pinned = replay_step(two_layers(replace(PER_LAYER, dispatch=0.5)))[1]
    assert pinned == 9.0


def test_a_pin_memory_relay_copies_on_the_host_first():
    costs = replace(SPECULATED, memcpy=0.5)
    sc = replace(stub_scenario(costs, "infinigen", n_layers=2, full_fetch_layers=1),
                 runtime=runtime(memory={"host_kv": "pageable", "pageable_copy": "relay"}))
    log, end = replay_step(sc)
    assert ("dispatch commit:relay[0] start", 0.5) in log and ("h2d_link h2d:kv[0] start", 1.0) in log
    assert not any("relay[1]" in e for e, _ in log)  # gathered rows land in pinned staging: no relay
    assert end == 8.0


def test_previous_tail_issues_layer_zeros_fetch_during_the_last_layer():
    """Full replay of 3 decode steps: with previous_tail, steps after the first start with layer 0's
    K/V already on its way; the last step issues nothing for a step that never comes."""
    hw = load_hardware("a100_pcie4")
    base = Point(hw, "opt-6.7b", make_policy("flexgen"), 4, 512, 4, runtime=runtime())
    tail = replace(base, runtime=runtime(decode={"first_fetch": "previous_tail"}))
    start = simulate(scenario_for(base)[0], "full")
    early = simulate(scenario_for(tail)[0], "full")
    assert early.decode_s < start.decode_s
    assert early.prefill_s == start.prefill_s


# ---- prefill store -------------------------------------------------------------------------------
@pytest.mark.parametrize(("store", "first_store", "end"), [
    ("overlapped", (1.0, 3.0), 8.0),  # beside attention and MLP; the next layer goes on
    ("mlp", (2.0, 4.0), 8.0),          # after attention, joined at the MLP's end
    ("serialised", (1.0, 3.0), 12.0),  # waited for before the layer attends
])
def test_prefill_store_modes(store, first_store, end):
    sc = replace(stub_scenario(StubCosts({"qkv": 1, "attention": 1, "ffn": 2}, d2h=2), n_layers=2),
                 runtime=runtime(prefill={"store": store}))
    log, done = replay_prefill(sc)
    times = dict(log)
    assert (times["d2h_link d2h:prompt[0] start"], times["d2h_link d2h:prompt[0] end"]) == first_store
    assert done == end
    if store == "serialised":
        assert times["gpu attention[0] start"] == times["d2h_link d2h:prompt[0] end"]
    if store == "mlp":
        assert times["gpu qkv[1] start"] >= times["d2h_link d2h:prompt[0] end"]


# ---- per-layer budgets and kernel styles ---------------------------------------------------------
def test_artifact_h2o_keeps_the_whole_prompt_in_layers_0_and_1():
    art = load_runtime("infinigen-artifact").for_policy("h2o")
    h2o = art.policies.apply(make_policy("h2o"))
    model = get_model("opt-13b")
    assert [h2o_kept(h2o, 1920, layer) for layer in (0, 1)] == [1920, 1920]
    assert h2o_kept(h2o, 1920, 2) == h2o_kept(make_policy("h2o"), 1920, 2) < 1920
    rows = [fetch_tokens(h2o, layer, 1921, 1920) for layer in range(model.n_layers)]
    assert rows[0] == rows[1] > rows[2] == rows[-1]
    plain = load_runtime("infinigen-sim").policies.apply(make_policy("h2o"))
    assert plain == make_policy("h2o")


def test_eager_kernels_move_more_bytes_than_fused():
    art = load_runtime("infinigen-artifact")
    model = get_model("opt-13b")
    eager_decode = op_work(Op.ATTENTION, model, 8, 1, 2048, style=art.for_policy("infinigen").kernels)
    assert eager_decode.hbm_bytes > op_work(Op.ATTENTION, model, 8, 1, 2048, style=FUSED).hbm_bytes
    eager_prefill = op_work(Op.ATTENTION, model, 1, 2048, 2048, style=art.kernels)
    fused_prefill = op_work(Op.ATTENTION, model, 1, 2048, 2048)
    scores = model.n_heads * 2048 * 2048
    assert eager_prefill.hbm_bytes - fused_prefill.hbm_bytes == pytest.approx(art.kernels.prefill_score_bytes * scores)
    dq = op_work(Op.DEQUANTIZE, model, 8, 1, 2048, style=art.kernels)
    assert dq.hbm_bytes / op_work(Op.DEQUANTIZE, model, 8, 1, 2048).hbm_bytes == pytest.approx(13.1 / 2.5)


# ---- whole points --------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "policy", "batch", "prompt", "gen"), [
    (name, policy, batch, prompt, gen) for name, policy, (batch, prompt, gen) in itertools.product(
        ("infinigen-artifact", "infinigen-sim"), ("flexgen", "h2o", "infinigen", "int4"),
        ((4, 1024, 12), (1, 512, 9)))])
def test_fast_mode_matches_full_under_each_runtime(name, policy, batch, prompt, gen):
    point = Point(load_hardware("a100_pcie4"), "opt-6.7b", make_policy(policy), batch, prompt, gen,
                  runtime=load_runtime(name))
    sc = scenario_for(point)[0]
    fast, full = simulate(sc, "fast"), simulate(sc, "full")
    assert fast.total_s == pytest.approx(full.total_s, rel=5e-3)


def test_the_artifact_is_never_faster_than_this_projects_runtime():
    hw = load_hardware("a6000_pcie3")
    for policy in ("flexgen", "int4", "h2o", "infinigen"):
        times = [simulate(scenario_for(Point(hw, "opt-6.7b", make_policy(policy), 4, 2048, 8,
                                             runtime=load_runtime(name)))[0]).total_s
                 for name in ("infinigen-sim", "infinigen-artifact")]
        assert times[1] > times[0], policy


def test_infinigen_is_no_faster_than_all_on_gpu_under_the_artifact():
    """The gap the issue names: a serialised runtime cannot make an InfiniGen step beat the ideal one."""
    hw = load_hardware("a100_pcie4")
    art = load_runtime("infinigen-artifact")
    steps = {p: simulate(scenario_for(Point(hw, "opt-6.7b", make_policy(p), 8, 2048, 8, runtime=art))[0])
             for p in ("ideal", "infinigen")}
    assert steps["infinigen"].step_s > steps["ideal"].step_s


def test_the_studys_ablation_swaps_one_section_everywhere():
    import importlib.util

    from infinigen_sim.spec.runtime import RUNTIME_DIR, load_runtime_raw

    path = RUNTIME_DIR.parent.parent / "experiments" / "runtime_study.py"
    spec = importlib.util.spec_from_file_location("runtime_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    ours, art = load_runtime_raw("infinigen-sim"), load_runtime_raw("infinigen-artifact")
    variant = study.ablated(art, ours, ("memory",), "artifact-without-memory")
    sim, artifact = load_runtime("infinigen-sim"), load_runtime("infinigen-artifact")
    for policy in PolicyName:
        assert variant.for_policy(policy).memory == sim.memory  # by_policy's memory overrides dropped too
        assert variant.for_policy(policy).decode == artifact.for_policy(policy).decode  # the rest untouched
    assert len(study.runtimes()) == 2 + len(study.MECHANISMS)
