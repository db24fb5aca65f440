"""`rlhf eval`: sample from several models under the same settings and seed, score, compare, plot.

    metrics.py     the figures as pure functions (reward spread, win rate, KL, distinct-n, perplexity)
    sampling.py    one model: generate, truncate, decode, log-probs of its samples (and the reference's)
    perplexity.py  held-out perplexity of a causal model on a text set
    plots.py       reward distributions and training curves (PNG + the data behind them)
    report.py      eval.json, samples.jsonl and the rich table
"""
