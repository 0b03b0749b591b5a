"""NPM + OPM: Orion (LayerNorm with bias) -> Llama (RMSNorm), training-free. docs/kept.md.

LN(x) = gamma * a + beta with a = (x - mean)/std; RMSNorm(x) = g * u with u = x/rms. Strategies:

- copy:       g = gamma, beta dropped, no recentering (the paper's near-zero-mean assumption)
- lsq:        g = least-squares gain over calibration activations, no recentering
- center:     recenter the residual writers (then u = a exactly), g = gamma, beta dropped
- center-lsq: recenter, then the least-squares gain g = gamma + beta * E[a] / E[a^2]
- absorb:     recenter, g = 1, and the next weights W' = W diag(gamma) + (W beta) (C^+ m)^T (q/k/v, gate/up,
              lm_head), with m = E[a], C = E[a a^T]: a stock bias-free Llama
- exact:      recenter, g = gamma, beta into biases (bias = W beta for q/k/v and gate/up, 0 for o/down), and the
              rank-1 edit of lm_head for the final norm's beta

All arithmetic is float64 on HF-layout tensors ([out, in] for linear weights).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from kept_jax.config import ModelConfig
from kept_jax.errors import KeptError
from kept_jax.mapping.calibration import SiteStats
from kept_jax.mapping.rules import Mapping, Rule, identity

STRATEGIES = ("copy", "lsq", "center", "center-lsq", "absorb", "exact")
RECENTERING = frozenset({"center", "center-lsq", "absorb", "exact"})
DEFAULT_RIDGE = 1e-6


# ---- The math, each piece a small pure function ----------------------------------------------------


def recenter_writer(weight: np.ndarray) -> np.ndarray:
    """A residual writer [hidden_out, in] minus its mean over the hidden index: its output becomes zero-mean."""
    return weight - weight.mean(axis=0, keepdims=True)


def recenter_embedding(embedding: np.ndarray) -> np.ndarray:
    """Embedding rows [vocab, hidden] minus their mean over the hidden index."""
    return embedding - embedding.mean(axis=1, keepdims=True)


def _moments(stats: SiteStats, centered: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """E[a], E[a^2], E[u], E[u^2], E[a u], where u is the RMSNorm input of the converted model."""
    ea, eaa = stats.mean("a"), stats.mean("aa")
    if centered:  # the recentered stream's RMSNorm sees u = a
        return ea, eaa, ea, eaa, eaa
    return ea, eaa, stats.mean("u"), stats.mean("uu"), stats.mean("au")


def lsq_gain(gamma: np.ndarray, beta: np.ndarray, stats: SiteStats, centered: bool) -> np.ndarray:
    """g_j = (gamma_j E[a_j u_j] + beta_j E[u_j]) / E[u_j^2]: per channel, the best g_j u_j for gamma_j a_j + beta_j."""
    _, _, eu, euu, eau = _moments(stats, centered)
    return (gamma * eau + beta * eu) / euu


def gain_error(gamma: np.ndarray, beta: np.ndarray, gain: np.ndarray, stats: SiteStats, centered: bool) -> float:
    """E||gamma*a + beta - gain*u||^2 / E||gamma*a + beta||^2 on the calibration data."""
    ea, eaa, eu, euu, eau = _moments(stats, centered)
    target = gamma**2 * eaa + 2 * gamma * beta * ea + beta**2
    residual = target + gain**2 * euu - 2 * gamma * gain * eau - 2 * beta * gain * eu
    return float(residual.sum() / target.sum())


def absorb_direction(stats: SiteStats, ridge: float) -> np.ndarray:
    """k = (C + lambda I)^-1 m with C = E[a a^T], m = E[a], lambda = ridge * tr(C)/D.

    C is singular along the all-ones vector (a is zero-mean over channels); m has no component there, so a small
    ridge gives the pseudo-inverse solution.
    """
    if stats.aa_outer is None:
        raise ValueError("absorb needs the full second moment at this site (calibrate with outer_sites)")
    c, m = stats.aa_outer / stats.n, stats.mean("a")
    lam = ridge * np.trace(c) / len(m)
    return np.linalg.solve(c + lam * np.eye(len(m)), m)


def absorb(weight: np.ndarray, gamma: np.ndarray, beta: np.ndarray, k: np.ndarray) -> np.ndarray:
    """W' = W diag(gamma) + (W beta) k^T: the linear map of a that best reproduces W (gamma*a + beta)."""
    return weight * gamma[None, :] + np.outer(weight @ beta, k)


def absorb_error(stats: SiteStats, k: np.ndarray) -> float:
    """E||W beta - (W beta) k^T a||^2 / ||W beta||^2 = 1 - 2 k^T m + k^T C k: the part of W beta left unabsorbed."""
    c, m = stats.aa_outer / stats.n, stats.mean("a")
    return float(1 - 2 * k @ m + k @ c @ k)


def absorb_solution(stats: SiteStats, ridge: float) -> tuple[np.ndarray, float]:
    """The absorb direction for `ridge` and its error: the ones `solved` kept, or solved from the [D, D] moment."""
    if stats.absorb is not None and stats.absorb[0] == ridge:
        return stats.absorb[1], stats.absorb[2]
    k = absorb_direction(stats, ridge)
    return k, absorb_error(stats, k)


def solved(stats: SiteStats, ridge: float) -> SiteStats:
    """`stats` keeping of its [D, D] second moment only the absorb direction and its error for `ridge`: D numbers
    instead of D^2 per site (a 14B model's 81 sites would hold 17 GB of float64 moments)."""
    if stats.aa_outer is None:
        return stats
    return dataclasses.replace(stats, aa_outer=None, absorb=(ridge, *absorb_solution(stats, ridge)))


# ---- Building a mapping ---------------------------------------------------------------------------


def target_config(source: ModelConfig, strategy: str) -> ModelConfig:
    exact = strategy == "exact"
    return source.replace(architecture="llama", attention_bias=exact, mlp_bias=exact)


def _check(strategy: str, source: ModelConfig, stats: dict[str, SiteStats] | None) -> None:
    if strategy not in STRATEGIES:
        raise KeptError(f"unknown OPM strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if source.architecture != "orion":
        raise KeptError(f"OPM converts Orion (LayerNorm) checkpoints; the source is {source.architecture!r}")
    if source.attention_bias or source.mlp_bias:
        raise KeptError("OPM expects bias-free linear layers, as Orion has; the source has attention or MLP biases")
    if strategy in ("absorb", "exact") and source.tie_word_embeddings:
        raise KeptError(f"OPM strategy {strategy!r} edits lm_head, which a tied source does not have")
    if strategy not in ("copy", "center") and stats is None:
        raise KeptError(f"OPM strategy {strategy!r} needs calibration statistics")


def build_mapping(
    strategy: str, source: ModelConfig, stats: dict[str, SiteStats] | None = None, ridge: float = DEFAULT_RIDGE
) -> Mapping:
    """The NPM + OPM rules for `strategy`; `stats` are the teacher's norm-site statistics (see calibration)."""
    _check(strategy, source, stats)
    target = target_config(source, strategy)
    centered = strategy in RECENTERING
    rules: list[Rule] = []
    dropped: dict[str, str] = {}
    solutions: dict[str, tuple[np.ndarray, float]] = {}

    def absorbed(site: str) -> tuple[np.ndarray, float]:
        """(direction, error) of the site's rank-1 absorb, solved once."""
        if site not in solutions:
            solutions[site] = absorb_solution(stats[site], ridge)
        return solutions[site]

    def norm_rules(site: str) -> None:
        """The gain rule of one norm site, and what happens to its beta when nothing else uses it."""
        st = stats.get(site) if stats else None
        weight, bias = f"{site}.weight", f"{site}.bias"
        if strategy in ("copy", "center"):
            err = (lambda g, b, st=st: gain_error(g, b, g, st, centered)) if st else None
            rules.append(Rule(weight, (weight,), "gain = gamma (beta dropped)", lambda g: g, err, (weight, bias)))
        elif strategy in ("lsq", "center-lsq"):
            fn = lambda g, b, st=st: lsq_gain(g, b, st, centered)  # noqa: E731
            err = lambda g, b, st=st: gain_error(g, b, lsq_gain(g, b, st, centered), st, centered)  # noqa: E731
            rules.append(Rule(weight, (weight, bias), "least-squares gain", fn, err, (weight, bias)))
        elif strategy == "absorb" or (strategy == "exact" and site == "model.norm"):
            rules.append(Rule(weight, (), "ones (gamma folded into next weights)", lambda: np.ones(source.hidden_size)))
        else:  # exact, layer norms: gamma stays the gain, beta goes into the next biases
            rules.append(identity(weight))

    def reader_rules(site: str, readers: list[str]) -> None:
        """The linear layers that read the output of norm `site`."""
        gamma, beta = f"{site}.weight", f"{site}.bias"
        for reader in readers:
            weight = f"{reader}.weight"
            if strategy == "absorb" or (strategy == "exact" and reader == "lm_head"):
                fn = lambda w, g, b, site=site: absorb(w, g, b, absorbed(site)[0])  # noqa: E731
                err = lambda site=site: absorbed(site)[1]  # noqa: E731
                rules.append(Rule(weight, (weight, gamma, beta), f"rank-1 absorb of {site.split('.')[-1]} beta", fn,
                                  err, block_axis=0))
            else:
                rules.append(identity(weight))
            if strategy == "exact" and reader != "lm_head":
                rules.append(Rule(f"{reader}.bias", (weight, beta), "bias = W beta", lambda w, b: w @ b, block_axis=0))

    def writer_rule(name: str) -> Rule:
        if not centered:
            return identity(name)
        if name == "model.embed_tokens.weight":
            return Rule(name, (name,), "recenter rows over hidden", recenter_embedding, block_axis=0)
        return Rule(name, (name,), "recenter output over hidden", recenter_writer, block_axis=1)

    rules.append(writer_rule("model.embed_tokens.weight"))
    for i in range(source.num_hidden_layers):
        layer = f"model.layers.{i}"
        norm_rules(f"{layer}.input_layernorm")
        reader_rules(f"{layer}.input_layernorm", [f"{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
        rules.append(writer_rule(f"{layer}.self_attn.o_proj.weight"))
        norm_rules(f"{layer}.post_attention_layernorm")
        reader_rules(f"{layer}.post_attention_layernorm", [f"{layer}.mlp.{p}" for p in ("gate_proj", "up_proj")])
        rules.append(writer_rule(f"{layer}.mlp.down_proj.weight"))
        if strategy == "exact":  # writers' biases: zero keeps the stream zero-mean
            for name, size in ((f"{layer}.self_attn.o_proj.bias", source.hidden_size), (f"{layer}.mlp.down_proj.bias", source.hidden_size)):
                rules.append(Rule(name, (), "zeros", lambda size=size: np.zeros(size)))
    norm_rules("model.norm")
    if not source.tie_word_embeddings:
        reader_rules("model.norm", ["lm_head"])

    # Which betas did nothing read? Those are dropped, and say so.
    used = {s for r in rules for s in r.sources}
    for spec in source.tensor_table():
        if spec.hf_name.endswith("layernorm.bias") or spec.hf_name == "model.norm.bias":
            if spec.hf_name not in used:
                dropped[spec.hf_name] = f"beta not representable by strategy {strategy!r}"
    return Mapping(strategy, source, target, rules, dropped)


def outer_sites(strategy: str, source: ModelConfig) -> list[str]:
    """Norm sites whose full second moment the strategy needs."""
    if strategy == "absorb":
        return [s.hf_name.removesuffix(".weight") for s in source.tensor_table() if s.hf_name.endswith("norm.weight")]
    if strategy == "exact":
        return ["model.norm"]
    return []

