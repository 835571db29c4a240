"""Agreement with exact multi-stage influence on a tiny GPT-NeoX (the paper's first experiment).

    python benchmarks/bench_exact_influence.py [--seeds 0 1 2] [--hidden 32] [--smoke]

The model is the toy world's (``msif_ray.demo.toy``), shrunk so that the Fisher over ALL tracked
parameters can be handled exactly in float64: pre-trained on ~500 documents, then fully
fine-tuned on question/answer pairs; ~10 queries about held-out people.

Ground truth (no Kronecker factoring, no block-diagonal truncation). With J [N, P] the per-example
gradients of log p over every tracked parameter (θ_pt on the corpus; θ_ft on the fine-tuning
pairs), the empirical Fisher is F = JᵀJ / N and

    exact(m, q) = α · g_qᵀ (F_ft + αI)⁻¹ (F_pt + λI)⁻¹ g_m,   g_q at θ_ft, g_m at θ_pt

by the Woodbury identity (F + λI)⁻¹v = (v − Jᵀ(NλI + JJᵀ)⁻¹Jv)/λ in float64 (an N x N solve
instead of P x P), cross-checked by conjugate gradient on v ↦ Jᵀ(Jv)/N + λv. Dampings are
relative to the mean eigenvalue: λ = m · tr(F_pt)/P, α = m · tr(F_ft)/P, m swept over
0.001..10 (0.1 is the engine's ``auto``: curvature.AUTO_DAMPING_SCALE).

Compared (empirical Fisher everywhere, like the ground truth; float64 models), per query over the
corpus, Pearson and Spearman, averaged over queries:

  exact block-diag  the same solve per layer (what block-diagonal truncation alone costs)
  multi_stage       msif's EK-FAC chain, per-layer dampings m x mean(Λ) (the engine's auto at m = 0.1)
  multi_stage/KFAC  the same with Λ replaced by d_S ⊗ d_A (the eigenvalues of S and A) x tokens/window
  multi_stage/global λ  EK-FAC with the exact's global λ and α (floats) instead of per-layer ones
  single_stage      EK-FAC at θ_ft, H fitted on the corpus at θ_ft (the pipeline's single_stage)
  grad_dot          g_q · g_m at θ_ft;  grad_dot θ_pt: g_q(θ_ft) · g_m(θ_pt) (the chain without inverses)
  kronfluence       kronfluence 1.0.1 single-stage EK-FAC at θ_ft (its defaults: sampled Fisher,
                    damping None = 0.1 x mean Λ per layer; sweep: one λ = m x mean Λ over layers)

The damping matrix (EK-FAC and K-FAC multi_stage at m_approx vs exact at m_exact) is what the
choice of the ``auto`` multiplier rests on.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import (flat, fmt, inverse, load_world, mean_spread, multi_stage_chain, new_figure, pearson, print_table,
                    result_paths, save_figure, setup, spearman, write_json)
from kf import PaddedTexts, kronfluence_single_stage
from msif_ray.engine.curvature import AUTO_DAMPING_SCALE, Factors, LayerFactors, accumulate_covariances, accumulate_lambdas, eigendecompose_layer, finish_factors
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.influence import precondition
from msif_ray.demo.toy import ToySpec

FULL = ToySpec(num_entities=50, num_query_entities=5, paraphrases_per_fact=4, num_filler_docs=100,
               hidden_size=32, num_heads=2, pretrain_steps=400, finetune_steps=120)
SMOKE = replace(FULL, num_entities=12, num_query_entities=2, paraphrases_per_fact=2, num_filler_docs=10,
                hidden_size=16, pretrain_steps=40, finetune_steps=10)
SCALES = [0.001, 0.01, 0.1, 1.0, 10.0]


# --------------------------------------------------------------------------- exact solves


def woodbury_inverse(j: torch.Tensor, damping: float, v: torch.Tensor) -> torch.Tensor:
    """(JᵀJ/N + λI)⁻¹ vᵀ for v [Q, P], J [N, P], float64: returns [Q, P]."""
    n = j.shape[0]
    kernel = j @ j.t() + n * damping * torch.eye(n, dtype=j.dtype)
    inner = torch.linalg.solve(kernel, j @ v.t())  # [N, Q]
    return (v - (j.t() @ inner).t()) / damping


def conjugate_gradient(j: torch.Tensor, damping: float, v: torch.Tensor, tol: float = 1e-12, max_iter: int = 5000) -> tuple[torch.Tensor, int]:
    """The same solve by CG on each row of v (batched, float64); returns x and the iterations used."""
    n = j.shape[0]
    apply = lambda x: (x @ j.t()) @ j / n + damping * x
    x = torch.zeros_like(v)
    r = v.clone()
    p = r.clone()
    rs = (r * r).sum(1, keepdim=True)
    target = tol * (v * v).sum(1, keepdim=True)
    for it in range(1, max_iter + 1):
        ap = apply(p)
        step = rs / (p * ap).sum(1, keepdim=True)
        x += step * p
        r -= step * ap
        new = (r * r).sum(1, keepdim=True)
        if bool((new <= target).all()):
            return x, it
        p = r + (new / rs) * p
        rs = new
    return x, max_iter


def mean_eigenvalue(j: torch.Tensor) -> float:
    """tr(JᵀJ/N) / P."""
    return float(j.square().sum()) / (j.shape[0] * j.shape[1])


def block_diagonal_per_layer(j_pt, j_ft, g_q, scale: float, blocks: list[slice]) -> torch.Tensor:
    """The block-diagonal chain with the engine's per-layer dampings λ_l = m · tr(F_l)/P_l (= m · mean Λ_l)."""
    out = []
    for b in blocks:
        lam, alpha = scale * mean_eigenvalue(j_pt[:, b]), scale * mean_eigenvalue(j_ft[:, b])
        out.append(alpha * woodbury_inverse(j_pt[:, b], lam, woodbury_inverse(j_ft[:, b], alpha, g_q[:, b])))
    return torch.cat(out, dim=1)


def exact_multi_stage(j_pt, j_ft, g_q, scale: float, blocks: list[slice] | None = None) -> torch.Tensor:
    """α · (F_pt+λ)⁻¹ (F_ft+α)⁻¹ g_q [Q, P]; with ``blocks``, F restricted to its diagonal blocks (same λ, α)."""
    lam, alpha = scale * mean_eigenvalue(j_pt), scale * mean_eigenvalue(j_ft)
    if blocks is None:
        return alpha * woodbury_inverse(j_pt, lam, woodbury_inverse(j_ft, alpha, g_q))
    return torch.cat([alpha * woodbury_inverse(j_pt[:, b], lam, woodbury_inverse(j_ft[:, b], alpha, g_q[:, b]))
                      for b in blocks], dim=1)


# --------------------------------------------------------------------------- EK-FAC and K-FAC factors


def ekfac_and_kfac(lm: TrackedLM, examples: Examples) -> tuple[Factors, Factors]:
    """The engine's EK-FAC factors (empirical Fisher) and K-FAC factors on the same eigenbases.

    K-FAC's eigenvalues are d_S ⊗ d_A (eigenvalues of the token-normalised S and A) times the mean
    number of tokens per window, so that they approximate E[vec G vec Gᵀ] per window like Λ.
    """
    batches = lm.batches(examples)
    cov = accumulate_covariances(lm.model, lm.taps, batches, "empirical")
    bases = {n: eigendecompose_layer(n, cov) for n in lm.layers}
    ekfac = finish_factors(bases, accumulate_lambdas(lm.model, lm.taps, batches, bases, "empirical"), {})
    per_window = cov.num_tokens / cov.num_windows
    kfac = Factors({n: LayerFactors(b.a_vectors, b.s_vectors, per_window * torch.outer(b.s_values, b.a_values).clamp_min(0))
                    for n, b in bases.items()})
    return ekfac, kfac


def layer_slices(grads: dict[str, torch.Tensor], layers: list[str]) -> list[slice]:
    out, start = [], 0
    for n in layers:
        size = grads[n][0].numel()
        out.append(slice(start, start + size))
        start += size
    return out


# --------------------------------------------------------------------------- one seed


def run_seed(spec: ToySpec, seed: int, log, workdir: Path) -> dict:
    t0 = time.process_time()
    lw = load_world(spec, seed, dtype=torch.float64, log=log)
    pt = TrackedLM(lw.pretrained, lw.tokenizer, max_length=128, batch_size=32)
    ft = TrackedLM(lw.finetuned, lw.tokenizer, max_length=128, batch_size=32)
    layers = pt.layers
    docs = Examples.documents(lw.texts)
    pairs = Examples.pairs([p for p, _ in lw.finetune], [c for _, c in lw.finetune])
    qx = Examples.pairs([q["prompt"] for q in lw.queries], [q["completion"] for q in lw.queries])

    g_q_layers = ft.gradients(qx)
    g_q = flat(g_q_layers, layers)
    j_pt = flat(pt.gradients(docs), layers)            # [N, P] at θ_pt
    j_ft = flat(ft.gradients(pairs), layers)           # [N_ft, P] at θ_ft
    j_ftc = flat(ft.gradients(docs), layers)           # corpus at θ_ft (single_stage, grad_dot)
    blocks = layer_slices(g_q_layers, layers)
    num_params = j_pt.shape[1]
    log(f"seed {seed}: {num_params} tracked parameters, J_pt {tuple(j_pt.shape)}, J_ft {tuple(j_ft.shape)}")

    exact = {m: j_pt @ exact_multi_stage(j_pt, j_ft, g_q, m).t() for m in SCALES}
    block = {m: j_pt @ exact_multi_stage(j_pt, j_ft, g_q, m, blocks).t() for m in SCALES}
    block_per_layer = {m: j_pt @ block_diagonal_per_layer(j_pt, j_ft, g_q, m, blocks).t() for m in SCALES}
    # One stage at a time, exact: (F_pt + λ)⁻¹ alone and α(F_ft + α)⁻¹ alone, scored against g_m(θ_pt).
    exact_pt_only = {m: j_pt @ woodbury_inverse(j_pt, m * mean_eigenvalue(j_pt), g_q).t() for m in SCALES}
    exact_ft_only = {m: j_pt @ (m * mean_eigenvalue(j_ft) * woodbury_inverse(j_ft, m * mean_eigenvalue(j_ft), g_q)).t()
                     for m in SCALES}

    # Cross-check of the ground truth by conjugate gradient at the auto multiplier.
    m = AUTO_DAMPING_SCALE
    lam, alpha = m * mean_eigenvalue(j_pt), m * mean_eigenvalue(j_ft)
    after_ft, it_ft = conjugate_gradient(j_ft, alpha, g_q)
    after_pt, it_pt = conjugate_gradient(j_pt, lam, after_ft)
    cg_scores = j_pt @ (alpha * after_pt).t()
    cg = {"scale": m, "iterations": [it_ft, it_pt],
          "relative_difference": float((cg_scores - exact[m]).norm() / exact[m].norm()),
          "min_pearson": float(pearson(cg_scores, exact[m]).min())}
    log(f"seed {seed}: CG vs Woodbury at m={m}: relative difference {cg['relative_difference']:.2e} "
        f"({it_ft} + {it_pt} iterations)")

    ek_pt, kf_pt = ekfac_and_kfac(pt, docs)
    ek_ft, kf_ft = ekfac_and_kfac(ft, pairs)
    ek_c, _ = ekfac_and_kfac(ft, docs)

    def scored(j, v):
        return j @ flat(v, layers).t()

    approx: dict[str, dict[float, torch.Tensor]] = {
        "multi_stage": {s: scored(j_pt, multi_stage_chain(g_q_layers, ek_pt, ek_ft, f"{s}x", f"{s}x")) for s in SCALES},
        "multi_stage/KFAC": {s: scored(j_pt, multi_stage_chain(g_q_layers, kf_pt, kf_ft, f"{s}x", f"{s}x")) for s in SCALES},
        "multi_stage/global λ": {s: scored(j_pt, multi_stage_chain(g_q_layers, ek_pt, ek_ft, s * mean_eigenvalue(j_pt),
                                                                   s * mean_eigenvalue(j_ft))) for s in SCALES},
        "single_stage": {s: scored(j_ftc, inverse(ek_c, g_q_layers, f"{s}x")) for s in SCALES},
        "grad_dot": {s: j_ftc @ g_q.t() for s in SCALES},
        "grad_dot θ_pt": {s: j_pt @ g_q.t() for s in SCALES},
    }
    # The engine's own chain at `auto` must equal the sweep's m = AUTO_DAMPING_SCALE column.
    engine_auto = scored(j_pt, precondition(g_q_layers, "multi_stage", ek_pt, ek_ft))
    assert torch.allclose(engine_auto, approx["multi_stage"][AUTO_DAMPING_SCALE], rtol=1e-9, atol=1e-12 * float(engine_auto.abs().max()))

    # kronfluence single-stage at θ_ft on the corpus: its heuristic, then one λ per sweep point.
    mean_lambda = float(torch.cat([f.lambdas.flatten() for f in ek_c.layers.values()]).double().mean())
    pad = lw.tokenizer.pad_token_id
    kf_scores, kf_seconds = kronfluence_single_stage(
        lw.finetuned, layers, PaddedTexts(docs.encode(lw.tokenizer), pad), PaddedTexts(qx.encode(lw.tokenizer), pad),
        [None] + [s * mean_lambda for s in SCALES], workdir / f"kf{seed}", dtype=torch.float64)
    approx["kronfluence"] = {s: kf_scores[s * mean_lambda] for s in SCALES}
    kf_auto = kf_scores[None]

    def corr(a, b) -> dict[str, float]:
        p, s = pearson(a, b), spearman(a, b)
        return {"pearson": float(p.mean()), "spearman": float(s.mean()), "pearson_min": float(p.min())}

    ref = exact[AUTO_DAMPING_SCALE]
    at_auto = {"exact block-diag": corr(block[AUTO_DAMPING_SCALE], ref)}
    at_auto |= {name: corr(v[AUTO_DAMPING_SCALE], ref) for name, v in approx.items() if name != "kronfluence"}
    at_auto["kronfluence"] = corr(kf_auto, ref)
    matched = {"exact block-diag": {s: corr(block[s], exact[s]) for s in SCALES}}
    matched |= {name: {s: corr(v[s], exact[s]) for s in SCALES} for name, v in approx.items()}
    # Where the error comes from: EK-FAC against the exact block-diagonal answer with the same
    # per-layer dampings (the Kronecker approximation alone), and each stage on its own.
    diagnostics = {
        "EK-FAC vs exact block-diag, per-layer λ": {s: corr(approx["multi_stage"][s], block_per_layer[s]) for s in SCALES},
        "K-FAC vs exact block-diag, per-layer λ": {s: corr(approx["multi_stage/KFAC"][s], block_per_layer[s]) for s in SCALES},
        "exact block-diag per-layer λ vs exact": {s: corr(block_per_layer[s], exact[s]) for s in SCALES},
        "pre-training stage only: EK-FAC vs exact": {s: corr(scored(j_pt, inverse(ek_pt, g_q_layers, s * mean_eigenvalue(j_pt))),
                                                             exact_pt_only[s]) for s in SCALES},
        "fine-tuning stage only: EK-FAC vs exact": {
            s: corr(scored(j_pt, {n: s * mean_eigenvalue(j_ft) * v for n, v in
                                  inverse(ek_ft, g_q_layers, s * mean_eigenvalue(j_ft)).items()}), exact_ft_only[s])
            for s in SCALES},
        "exact pre-training stage only vs exact": {s: corr(exact_pt_only[s], exact[s]) for s in SCALES},
        "exact fine-tuning stage only vs exact": {s: corr(exact_ft_only[s], exact[s]) for s in SCALES},
    }
    matrix = {name: {f"{se}": {f"{sa}": corr(approx[name][sa], exact[se])["pearson"] for sa in SCALES} for se in SCALES}
              for name in ("multi_stage", "multi_stage/KFAC", "single_stage")}
    log(f"seed {seed}: at auto, Pearson vs exact: " + ", ".join(f"{k} {v['pearson']:.3f}" for k, v in at_auto.items())
        + f" ({time.process_time() - t0:.0f}s CPU)")
    return {"seed": seed, "num_documents": len(lw.documents), "num_queries": len(lw.queries), "num_parameters": num_params,
            "num_finetune_pairs": len(lw.finetune), "world_stats": lw.world.stats(), "cg_check": cg,
            "at_auto": at_auto, "matched": matched, "diagnostics": diagnostics, "matrix_pearson": matrix, "kronfluence_seconds": kf_seconds,
            "cpu_seconds": time.process_time() - t0}


# --------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="world seeds (default 0 1 2; smoke: 0)")
    parser.add_argument("--hidden", type=int, default=None, help="model width (P grows as ~24 x hidden²)")
    parser.add_argument("--entities", type=int, default=None, help="people (corpus ≈ 8 x entities + filler)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    setup(args.threads)
    spec = SMOKE if args.smoke else FULL
    spec = replace(spec, **{k: v for k, v in (("hidden_size", args.hidden), ("num_entities", args.entities)) if v})
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = [run_seed(spec, s, lambda line: print(line, flush=True), Path(tmp)) for s in seeds]

    methods = list(per_seed[0]["matched"])
    at_auto = {m: {k: mean_spread([s["at_auto"][m][k] for s in per_seed]) for k in ("pearson", "spearman")}
               for m in per_seed[0]["at_auto"]}
    matched = {m: {str(sc): {k: mean_spread([s["matched"][m][sc][k] for s in per_seed]) for k in ("pearson", "spearman")}
                   for sc in SCALES} for m in methods}
    matrix = {name: {se: {sa: mean_spread([s["matrix_pearson"][name][se][sa] for s in per_seed])["mean"]
                          for sa in per_seed[0]["matrix_pearson"][name][se]} for se in per_seed[0]["matrix_pearson"][name]}
              for name in per_seed[0]["matrix_pearson"]}
    diagnostics = {d: {str(sc): mean_spread([s["diagnostics"][d][sc]["pearson"] for s in per_seed])["mean"] for sc in SCALES}
                   for d in per_seed[0]["diagnostics"]}
    best = {name: {se: max(row, key=row.get) for se, row in m.items()} for name, m in matrix.items()}

    s0 = per_seed[0]
    print(f"\nexact influence: {s0['num_queries']} queries x {s0['num_documents']} documents, {s0['num_parameters']} "
          f"tracked parameters, {len(seeds)} seeds; per-query correlation, mean over queries, then mean ± sd over seeds")
    tables = {"auto": print_table(["method (damping auto; exact at m=0.1)", "Pearson", "Spearman"],
                                  [[m, fmt(v["pearson"]), fmt(v["spearman"])] for m, v in at_auto.items()])}
    tables["sweep"] = print_table(["Pearson, matched damping m"] + [f"m={s}" for s in SCALES],
                                  [[m] + [f"{matched[m][str(s)]['pearson']['mean']:.3f}" for s in SCALES] for m in methods])
    tables["sweep_spearman"] = print_table(["Spearman, matched damping m"] + [f"m={s}" for s in SCALES],
                                           [[m] + [f"{matched[m][str(s)]['spearman']['mean']:.3f}" for s in SCALES] for m in methods])
    tables["diagnostics"] = print_table(["where the error comes from (Pearson)"] + [f"m={s}" for s in SCALES],
                                        [[d] + [f"{v[str(s)]:.3f}" for s in SCALES] for d, v in diagnostics.items()])
    tables["matrix"] = print_table(["EK-FAC multi_stage Pearson: exact m \\ approx m"] + [f"{s}" for s in SCALES],
                                   [[f"exact m={se}"] + [f"{matrix['multi_stage'][se][str(sa)]:.3f}" for sa in SCALES]
                                    for se in matrix["multi_stage"]])
    per_seed_best = {name: [{se: max(row, key=row.get) for se, row in s["matrix_pearson"][name].items()} for s in per_seed]
                     for name in matrix}
    json_path, png_path = result_paths("exact_influence", args.smoke, args.out_dir)
    import sys
    payload = {"command": "python benchmarks/bench_exact_influence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "spec": spec.__dict__, "seeds": seeds, "scales": SCALES, "auto_scale": AUTO_DAMPING_SCALE,
               "at_auto": at_auto, "matched": matched, "diagnostics": diagnostics, "matrix_pearson": matrix, "best_approx_scale_per_exact_scale": best,
               "best_approx_scale_per_seed": per_seed_best, "tables": tables, "per_seed": per_seed,
               "wall_seconds": time.perf_counter() - started}
    write_json(json_path, payload)

    fig, axes = new_figure(3, 1, size=(5.2, 4.0))
    ax = axes[0][0]
    for m in methods:
        ax.plot(SCALES, [matched[m][str(s)]["pearson"]["mean"] for s in SCALES], marker="o", label=m)
    ax.set_xscale("log"); ax.set_xlabel("damping m (x mean eigenvalue), exact at the same m"); ax.set_ylabel("Pearson vs exact")
    ax.axvline(AUTO_DAMPING_SCALE, color="gray", ls=":"); ax.legend(fontsize=6); ax.set_title("matched damping", fontsize=9)
    for ax, name in zip(axes[0][1:], ("multi_stage", "multi_stage/KFAC")):
        grid = torch.tensor([[matrix[name][str(se)][str(sa)] for sa in SCALES] for se in SCALES])
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(SCALES)), [str(s) for s in SCALES]); ax.set_yticks(range(len(SCALES)), [str(s) for s in SCALES])
        ax.set_xlabel("approximation m"); ax.set_ylabel("exact m"); ax.set_title(f"{name}: Pearson", fontsize=9)
        for i in range(len(SCALES)):
            for k in range(len(SCALES)):
                ax.text(k, i, f"{grid[i, k]:.2f}", ha="center", va="center", fontsize=7, color="w" if grid[i, k] < 0.6 else "k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, png_path)
    return payload


if __name__ == "__main__":
    main()
