"""The capstone's corpus, store, pipeline and model accounting."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalelab import capstone as c
from scalelab import data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return c.build_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=300_000, seq_len=32)


def test_corpus_is_split_by_file_and_round_trips(corpus):
    card = json.loads((corpus.train.parent / "card.json").read_text())
    assert card == json.loads(json.dumps(corpus.card)) and card["licence"].startswith("PSF")
    tr, va = card["splits"]["train"], card["splits"]["val"]
    assert not set(tr["file_names"]) & set(va["file_names"])  # held out by whole files
    files = c.stdlib_files(300_000)
    assert sorted(tr["file_names"] + va["file_names"]) == [f.name for f in files]
    assert 0.05 < va["bytes"] / (tr["bytes"] + va["bytes"]) <= 0.2 + 1e-3  # about 10%, never one huge file
    first = files[0].read_bytes()
    train_tokens = c.store_tokens(corpus.train)
    assert c.decode(train_tokens[: len(first)]) == first.decode("utf-8", errors="replace")
    with data.Store(corpus.train, verify=True) as store:  # checksums hold
        assert len(store) == tr["windows"] and store.read(0, 2, ("x",))["x"].shape == (2, 33)


def test_windows_overlap_by_one_token_and_refuse_short_input():
    w = c.windows(np.arange(11), 5)
    assert w.tolist() == [[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, 9, 10]]
    with pytest.raises(ValueError, match="no window"):
        c.windows(np.arange(4), 5)
    with pytest.raises(ValueError, match="byte tokens"):
        c.decode([300])
    assert c.decode(c.encode("héllo")) == "héllo"


def test_unigram_loss_is_the_smoothed_frequency_cross_entropy():
    train, val = np.array([0, 0, 1]), np.array([0, 1, 2])
    counts = np.ones(256)
    counts[0] += 2
    counts[1] += 1
    p = counts / counts.sum()
    assert c.unigram_loss(train, val) == pytest.approx(-np.mean(np.log(p[[0, 1, 2]])))
    assert c.unigram_loss(np.arange(256), np.arange(256)) == pytest.approx(np.log(256))


def test_pipeline_shards_by_process_and_resumes_exactly(corpus):
    rows = {tuple(r) for r in np.asarray(next(c.batches(corpus.train, 4, seed=0)))}
    assert len(rows) == 4
    shards = [np.concatenate([np.asarray(next(it)) for _ in range(5)])
              for it in (c.batches(corpus.train, 4, seed=1, process_index=i, process_count=2) for i in range(2))]
    assert not {r.tobytes() for r in shards[0]} & {r.tobytes() for r in shards[1]}
    it = c.batches(corpus.train, 4, seed=3)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON: what a checkpoint keeps
    expected = [np.asarray(next(it)) for _ in range(3)]
    again = c.batches(corpus.train, 4, seed=3)
    again.set_state(state)
    assert all(np.array_equal(a, np.asarray(next(again))) for a in expected)
    with pytest.raises(ValueError, match="process_index"):
        c.batches(corpus.train, 4, process_index=2, process_count=2)


def test_param_count_formula_equals_the_model():
    for cfg in (c.GPTConfig(d=32, layers=1, heads=2, seq_len=8), c.GPTConfig(d=48, layers=3, heads=4, seq_len=20)):
        assert c.count_params(c.GPT(cfg)) == c.param_count(cfg)


def test_flops_formulas_agree_with_xla_cost_analysis():
    # matmuls dominate at this width: the closed forms must be within 8% of what XLA counts
    # (the rest is LayerNorm, softmax, GELU and the loss); remat adds one forward of the blocks
    cfg = c.GPTConfig(d=128, layers=2, heads=4, seq_len=64, remat=False)
    tokens = 8 * cfg.seq_len
    for training in (False, True):
        ratio = c.xla_flops(cfg, 8, training) / (c.flops_per_token(cfg, training)["total"] * tokens)
        assert 1.0 <= ratio < 1.08, (training, ratio)
    remat = c.GPTConfig(d=128, layers=2, heads=4, seq_len=64, remat=True)
    ratio = c.xla_flops(remat, 8, True) / (c.remat_flops_per_token(remat) * tokens)
    assert 0.95 <= ratio < 1.08, ratio  # XLA may keep a little of the recomputed forward


def test_the_model_is_causal_and_keeps_float32_masters():
    cfg = c.GPTConfig(d=32, layers=2, heads=4, seq_len=16)
    model = c.GPT(cfg)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
    y = x.at[:, 10].set((x[:, 10] + 1) % 256)  # change one later token
    a, b = np.asarray(model(x)), np.asarray(model(y))
    assert np.array_equal(a[:, :10], b[:, :10]) and not np.array_equal(a[:, 10:], b[:, 10:])
    assert a.dtype == np.float32
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(nnx.state(model)))
    with pytest.raises(ValueError, match="exceed the context"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="divisible"):
        c.GPTConfig(d=30, heads=4)
    assert c.kv_cache_bytes(cfg, batch=2, length=16) == 2 * 2 * 2 * 16 * 32 * 2


def test_untrained_loss_is_near_uniform():
    cfg = c.GPTConfig(d=32, layers=1, heads=2, seq_len=16)
    rows = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 17)))
    assert float(c.next_token_loss(c.GPT(cfg), rows)) == pytest.approx(np.log(256), abs=0.05)


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_mesh_shapes_and_parameter_layout(devices):
    import jax

    data_axis, model_axis = c.mesh_shape(devices)
    assert data_axis * model_axis == devices
    mesh = c.make_mesh(jax.devices()[:devices])
    state, _, _ = c.init_train_state(c.GPTConfig(d=32, layers=1, heads=4, seq_len=16))
    shardings = c.state_shardings(state, mesh)
    qkv = shardings["params"]["blocks"][0]["qkv"]["kernel"].spec
    assert tuple(qkv) == ("data", "model")
    assert tuple(shardings["params"]["blocks"][0]["ln1"]["scale"].spec) == ()
    assert c.mesh_shape(8) == (4, 2) and c.mesh_shape(3) == (3, 1)
    with pytest.raises(ValueError, match="positive integer"):
        c.mesh_shape(0)


def test_sharded_step_equals_the_single_device_step():
    import jax

    rows = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.uint8)
    fp32 = c.sharded_vs_single(c.GPTConfig(d=32, layers=2, heads=4, seq_len=16, dtype="float32"), rows,
                               jax.devices()[:4])
    assert fp32["mesh"] == {"data": 2, "model": 2}
    assert fp32["params_max_abs_diff"] < 1e-4 and fp32["loss_max_abs_diff"] < 1e-5
    assert fp32["losses"][-1] < fp32["losses"][0]  # the steps train
    bf16 = c.sharded_vs_single(c.GPTConfig(d=32, layers=2, heads=4, seq_len=16), rows, jax.devices()[:4])
    assert bf16["loss_max_abs_diff"] < 1e-3  # bfloat16 sums in another order: equal to its precision


def test_the_kv_cache_gives_the_full_forward_and_the_same_generation():
    cfg = c.GPTConfig(d=32, layers=2, heads=4, seq_len=24, dtype="float32")
    model = c.GPT(cfg, seed=2)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 20)), jnp.int32)
    full = np.asarray(model(tokens))
    cache = c.init_cache(cfg, 2)
    logits, cache = model.cached(tokens[:, :12], cache, jnp.int32(0))  # prefill 12
    steps = [np.asarray(logits)]
    for i in range(12, 20):  # then one token at a time
        logits, cache = model.cached(tokens[:, i:i + 1], cache, jnp.int32(i))
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)
    assert c.kv_cache_bytes(cfg, 2, 24) == cache["k"].nbytes + cache["v"].nbytes
    prompt = np.asarray(tokens[:, :8])
    assert np.array_equal(c.generate(model, prompt, 10, use_cache=True), c.generate(model, prompt, 10, use_cache=False))
    with pytest.raises(ValueError, match="fit the context"):
        c.generate(model, prompt, 20)
    with pytest.raises(ValueError, match="cache length"):
        c.init_cache(cfg, 1, 25)


def test_the_exported_decode_step_equals_the_model():
    cfg = c.GPTConfig(d=32, layers=1, heads=4, seq_len=16)
    model = c.GPT(cfg)
    blob = c.export_decode(model, batch=2)
    state, prefill, decode, _ = c.decode_fns(model)
    prompt = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
    logits, cache = prefill(state, prompt, c.init_cache(cfg, 2))
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    want = decode(state, token, cache, jnp.int32(3))
    got = c.run_exported_decode(blob, state, token, cache, jnp.int32(3))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True))


def test_one_compiled_step_serves_every_learning_rate():
    import jax

    cfg = c.GPTConfig(d=32, layers=1, heads=4, seq_len=16, dtype="float32")
    run = c.setup(cfg, jax.devices()[:1], steps=10, warmup=2)
    x = run.put(np.random.default_rng(0).integers(0, 256, (4, 17)))
    finals = []
    for lr in (1e-3, 1e-2):
        state = run.fresh(lr)
        for _ in range(3):
            state, _ = run.step(state, x)
        finals.append(jax.device_get(state["params"]))
    assert run.step._cache_size() == 1  # compiled once for both rates
    from scalelab.parallel.data_parallel import max_abs_diff

    assert max_abs_diff(finals[0], finals[1]) > 0  # the rates differ in effect
    with pytest.raises(ValueError, match="lr must be"):
        c.init_train_state(cfg, lr=0.0)
    with pytest.raises(ValueError, match="mesh of 4 devices"):
        c.make_mesh(jax.devices()[:4], (3, 1))


def test_training_resumes_from_its_checkpoint_bit_for_bit(corpus, tmp_path):
    import jax

    from scalelab import checkpoint

    cfg = c.GPTConfig(d=32, layers=1, heads=4, seq_len=32)
    devices = jax.devices()[:2]
    whole = c.train(cfg, corpus.train, 8, 4, devices, ckpt_dir=tmp_path / "a", every=4)
    saves = []
    first = c.train(cfg, corpus.train, 4, 4, devices, ckpt_dir=tmp_path / "b", every=4, on_save=saves.append)
    assert saves == [1, 4] or saves == [4]  # the manager may also save the first step
    rest = c.train(cfg, corpus.train, 8, 4, devices, ckpt_dir=tmp_path / "b", every=4)  # resumes at step 4
    assert len(first["losses"]) == 4 and len(rest["losses"]) == 4
    assert first["losses"] + rest["losses"] == whole["losses"]
    assert checkpoint.bitwise_equal(jax.device_get(rest["state"]), jax.device_get(whole["state"]))
    for mesh in (None, c.make_mesh(devices, (2, 1))):  # restored onto another layout: the same values
        restored = c.restore_final(tmp_path / "a", cfg, mesh)
        assert checkpoint.bitwise_equal(jax.device_get(restored), jax.device_get(whole["state"]))


def test_the_mesh_peak_counts_a_cpu_once():
    import jax

    one = c.mesh_peak(jax.devices()[:1], "bfloat16")
    assert one.flops and c.mesh_peak(jax.devices()[:4], "bfloat16").flops == one.flops  # simulated: shared cores


# --------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from scalelab.capstone import server

    cfg = c.GPTConfig(d=32, layers=2, heads=4, seq_len=32)
    model = c.GPT(cfg, seed=4)
    return model, server.export_for_serving(tmp_path_factory.mktemp("serve"), model, slots=3)


def test_slots_decode_each_request_as_generate_does_alone(served):
    from scalelab.capstone import server

    model, folder = served
    engine = server.Engine(folder)
    assert engine.slots == 3 and engine.cfg == model.cfg
    prompts = [c.encode(t).astype(np.int32) for t in ("def ", "import x\n", "a", "class B:", "  ")]
    max_new = [5, 9, 1, 12, 4]
    scheduler = server.Scheduler(engine).start()
    outs = []
    try:
        import queue

        for p, n in zip(prompts, max_new, strict=True):
            q = queue.Queue()
            outs.append(q)
            scheduler.submit(server.Generation(prompt=p, max_new=n, temperature=0.0, seed=0, emit=q.put))
        got = []
        for q in outs:
            toks = []
            while (t := q.get(timeout=60)) is not None:
                toks.append(t)
            got.append(toks)
    finally:
        scheduler.stop()
    fns = c.decode_fns(model)
    for p, n, toks in zip(prompts, max_new, got, strict=True):
        assert toks == c.generate(model, p[None], n, fns=fns)[0, len(p):].tolist()
    assert scheduler.stats["requests"] == 5 and scheduler.stats["tokens"] == sum(max_new)
    assert scheduler.stats["busy_slot_steps"] > scheduler.stats["decode_steps"]  # steps were shared


def test_sampling_is_seeded_and_greedy_at_temperature_zero():
    from scalelab.capstone import server

    logits = np.array([0.0, 3.0, 1.0])
    assert server.pick(logits, 0.0, np.random.default_rng(0)) == 1
    a = [server.pick(logits, 1.0, np.random.default_rng(5)) for _ in range(3)]
    assert a == [server.pick(logits, 1.0, np.random.default_rng(5)) for _ in range(3)]


def test_bad_generate_requests_get_a_4xx_naming_what_was_expected(served):
    from fastapi.testclient import TestClient

    from scalelab.capstone import server

    model, folder = served
    with TestClient(server.create_app(str(folder))) as client:
        for name, (body, ct) in server.hostile_requests(model.cfg.seq_len).items():
            r = client.post("/generate", content=body, headers={"content-type": ct})
            assert 400 <= r.status_code < 500 and r.json()["error"], (name, r.status_code)
        r = client.post("/generate", json={"prompt": "x" * 30, "max_new_tokens": 5})
        assert r.status_code == 422 and "context of 32" in r.json()["error"]
        r = client.post("/generate", json={"prompt": "def ", "max_new_tokens": 4})
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert [("token" in x) for x in lines] == [True] * 4 + [False] and lines[-1]["done"] is True
        assert [x["token"] for x in lines[:4]] == c.generate(model, c.encode("def ")[None], 4)[0, 4:].tolist()
        assert client.get("/metrics").json()["rejected"] == len(server.hostile_requests(32)) + 1
    with pytest.raises(FileNotFoundError, match="not a serving folder"):
        server.Engine(folder.parent)
