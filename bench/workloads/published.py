"""ShareGPT-like and LongBench-like lengths, drawn from the datasets' published statistics.

No dataset is downloaded: each generator draws lengths from a simple distribution fitted to figures
the papers print. Every figure, its source, and every assumption we add:

ShareGPT (chat; the workload of vLLM's and DistServe's chatbot experiments).
  - Mean input 161.31 tokens, mean output 337.99 tokens: Kwon et al., "Efficient Memory Management
    for Large Language Model Serving with PagedAttention" (vLLM), SOSP 2023, §6.1 "Workloads" and
    Fig. 11a, whose legend prints "Input (mean: 161.31)" and "Output (mean: 337.99)" (Alpaca,
    Fig. 11b: 19.31 / 58.45); https://arxiv.org/abs/2309.06180. The text of §6.1 says "the
    ShareGPT dataset has 8.4x longer input prompts and 5.8x longer outputs on average than the
    Alpaca dataset, with higher variance", which those means give (8.35x, 5.78x). Checked against
    the paper's §6.1 text and a transcription of the figure's legend (the figure is an image).
  - What "input" and "output" are: the paper says only "we tokenize the datasets and use their
    input and output lengths"; it names no tokenizer (its models are OPT-13B/66B/175B and
    LLaMA-13B) nor which turns it takes. vLLM's benchmark sampler (vllm/benchmarks/datasets.py,
    `ShareGPTDataset` and `is_valid_sequence`, whose defaults it says are copied from the original
    benchmarks/benchmark_serving.py) takes each conversation's first turn (normally the user's) as
    the prompt and the second turn's token count as the output, and drops pairs with a prompt or
    output under 4 tokens, a prompt over 1024, or prompt + output over 2048. Whether Fig. 11 was drawn after that filter
    is not stated. This generator applies no such cap (use `max_context` / `max_output`).
  - Median, percentiles, spread: not published. The vLLM paper prints only the means; DistServe
    (Zhong et al., OSDI 2024, §6.1 and Fig. 7) shows ShareGPT's length distribution as a plot and
    prints no statistic; no other source found here gives them for this sampling. ASSUMPTION:
    log-normal with sigma = 1.0 for both input and output, i.e. median = mean * exp(-1/2) (input
    97.8, output 205.0). Replace `SHAREGPT_INPUT` / `SHAREGPT_OUTPUT` by
    `LogNormalLength.from_mean_median(...)` once a median is sourced.
  - ASSUMPTION: input and output lengths are drawn independently.

LongBench (long-context understanding; Bai et al., "LongBench: A Bilingual, Multitask Benchmark
for Long Context Understanding", ACL 2024, https://aclanthology.org/2024.acl-long.172, arXiv
2308.14508).
  - Per-task average length and sample count: the paper's Table 1 ("Avg len", "#data"), the same
    figures as LongBench/task.md ("LongBench statistics") in https://github.com/THUDM/LongBench.
    Lengths are in words (Python str.split) for English and code tasks, in characters for Chinese
    ones. We use the 16 English and code tasks (the Chinese ones count characters, whose token
    ratio differs by tokenizer): a request picks a task with probability proportional to its
    sample count. Check: the sample-weighted mean of those 16 averages is 6,711.3 words, the paper
    abstract's "average length of 6,711 words (English)".
  - Output budget: each task's max_new_tokens, from the repository's
    LongBench/config/dataset2maxlen.json (32 for multi-hop QA, TriviaQA and the synthetic tasks,
    64 for MultiFieldQA, TREC and code, 128 for NarrativeQA, Qasper and SAMSum, 512 for the
    summarisation tasks), which LongBench/pred.py passes to `generate` as max_new_tokens.
    ASSUMPTION: every request generates its full budget. That is an upper bound: pred.py stops at
    EOS (and, for SAMSum, at a newline), which LongBench does not report lengths for.
  - ASSUMPTION: 1.3 tokens per word (a common rule of thumb for English under LLaMA-style BPE
    tokenizers; code runs higher), so a task's mean context is 1.3 x its average words.
  - ASSUMPTION: within a task, context ~ log-normal with that mean and sigma = 0.5 (LongBench
    publishes averages only).

All lengths are rounded to integers and clipped to [1, max_context] (default: no upper clip; LongBench's
own pred.py truncates the middle of a prompt to the model's window, which `max_context` mimics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bench.workloads.arrivals import schedule
from bench.workloads.workload import LENGTHS_STREAM, Workload, build_requests, check_count


@dataclass(frozen=True, slots=True)
class LogNormalLength:
    """Token counts ~ round(exp(N(mu, sigma^2))), at least 1."""

    mu: float
    sigma: float

    @classmethod
    def from_mean_median(cls, mean: float, median: float) -> LogNormalLength:
        """The log-normal whose mean and median these are: mu = ln(median), sigma^2 = 2 ln(mean/median)."""
        if not 0 < median < mean:
            raise ValueError(f"median {median} and mean {mean}: a log-normal needs 0 < median < mean")
        return cls(math.log(median), math.sqrt(2 * math.log(mean / median)))

    @classmethod
    def from_mean_sigma(cls, mean: float, sigma: float) -> LogNormalLength:
        if not (mean > 0 and sigma >= 0):
            raise ValueError(f"mean {mean} and sigma {sigma}: need mean > 0 and sigma >= 0")
        return cls(math.log(mean) - sigma * sigma / 2, sigma)

    @property
    def mean(self) -> float:
        return math.exp(self.mu + self.sigma ** 2 / 2)

    @property
    def median(self) -> float:
        return math.exp(self.mu)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.maximum(1, np.rint(rng.lognormal(self.mu, self.sigma, size=size))).astype(np.int64)


SHAREGPT_MEAN_INPUT = 161.31   # vLLM (Kwon et al., SOSP 2023), §6.1, Fig. 11a legend
SHAREGPT_MEAN_OUTPUT = 337.99  # vLLM (Kwon et al., SOSP 2023), §6.1, Fig. 11a legend
SHAREGPT_SIGMA = 1.0           # assumption: no published median or spread (module docstring)
SHAREGPT_INPUT = LogNormalLength.from_mean_sigma(SHAREGPT_MEAN_INPUT, SHAREGPT_SIGMA)
SHAREGPT_OUTPUT = LogNormalLength.from_mean_sigma(SHAREGPT_MEAN_OUTPUT, SHAREGPT_SIGMA)


@dataclass(frozen=True, slots=True)
class LongBenchTask:
    name: str
    avg_words: int
    """Average context length in words: the paper's Table 1 "Avg len" (= LongBench/task.md)."""
    samples: int
    """Samples in the task: Table 1 "#data" (= LongBench/task.md "#Sample")."""
    max_new_tokens: int
    """Generation budget: LongBench/config/dataset2maxlen.json."""


LONGBENCH_TASKS = (
    LongBenchTask("hotpotqa", 9151, 200, 32),
    LongBenchTask("2wikimqa", 4887, 200, 32),
    LongBenchTask("musique", 11214, 200, 32),
    LongBenchTask("multifieldqa_en", 4559, 150, 64),
    LongBenchTask("narrativeqa", 18409, 200, 128),
    LongBenchTask("qasper", 3619, 200, 128),
    LongBenchTask("gov_report", 8734, 200, 512),
    LongBenchTask("qmsum", 10614, 200, 512),
    LongBenchTask("multi_news", 2113, 200, 512),
    LongBenchTask("triviaqa", 8209, 200, 32),
    LongBenchTask("samsum", 6258, 200, 128),
    LongBenchTask("trec", 5177, 200, 64),
    LongBenchTask("passage_retrieval_en", 9289, 200, 32),
    LongBenchTask("passage_count", 11141, 200, 32),
    LongBenchTask("lcc", 1235, 500, 64),
    LongBenchTask("repobench-p", 4206, 500, 64),
)
LONGBENCH_TOKENS_PER_WORD = 1.3  # assumption (module docstring)
LONGBENCH_SIGMA = 0.5            # assumption (module docstring)


def _clip(x: np.ndarray, max_context: int | None) -> np.ndarray:
    if max_context is None:
        return x
    if not (isinstance(max_context, int) and max_context >= 1):
        raise ValueError(f"max_context = {max_context!r}: a token count >= 1, or None for no clip")
    return np.minimum(x, max_context)


def sharegpt_workload(n: int, seed: int = 0, *, max_context: int | None = None, max_output: int | None = None,
                      arrivals: str = "all-at-once", rate: float | None = None, burstiness: float = 1.0) -> Workload:
    """`n` ShareGPT-like requests: log-normal input and output lengths (module docstring)."""
    check_count(n)
    rng = np.random.default_rng((seed, LENGTHS_STREAM))
    prompts = _clip(SHAREGPT_INPUT.sample(rng, n), max_context)
    outputs = _clip(SHAREGPT_OUTPUT.sample(rng, n), max_output)
    offsets, how = schedule(n, seed, arrivals, rate, burstiness)
    description = {
        "source": "ShareGPT-like: mean input 161.31 / output 337.99 tokens, vLLM (Kwon et al., SOSP 2023) §6.1, "
                  "Fig. 11a, https://arxiv.org/abs/2309.06180",
        "context": f"log-normal, mean {SHAREGPT_MEAN_INPUT}, sigma {SHAREGPT_SIGMA} (assumed), clip {max_context}",
        "output": f"log-normal, mean {SHAREGPT_MEAN_OUTPUT}, sigma {SHAREGPT_SIGMA} (assumed), clip {max_output}",
        "arrivals": how}
    return Workload("sharegpt", build_requests(prompts, outputs, offsets, seed), seed, description)


def longbench_workload(n: int, seed: int = 0, *, max_context: int | None = None,
                       tokens_per_word: float = LONGBENCH_TOKENS_PER_WORD, sigma: float = LONGBENCH_SIGMA,
                       arrivals: str = "all-at-once", rate: float | None = None, burstiness: float = 1.0) -> Workload:
    """`n` LongBench-like requests: a task by sample count, then its context and budget (docstring)."""
    check_count(n)
    if not tokens_per_word > 0:
        raise ValueError(f"tokens_per_word = {tokens_per_word!r}: must be > 0")
    if not sigma >= 0:
        raise ValueError(f"sigma = {sigma!r}: must be >= 0")
    rng = np.random.default_rng((seed, LENGTHS_STREAM))
    weights = np.array([t.samples for t in LONGBENCH_TASKS], dtype=float)
    task_of = rng.choice(len(LONGBENCH_TASKS), size=n, p=weights / weights.sum())
    prompts = np.empty(n, dtype=np.int64)
    for k, task in enumerate(LONGBENCH_TASKS):
        mine = task_of == k
        dist = LogNormalLength.from_mean_sigma(task.avg_words * tokens_per_word, sigma)
        prompts[mine] = dist.sample(rng, int(mine.sum()))
    prompts = _clip(prompts, max_context)
    outputs = np.array([t.max_new_tokens for t in LONGBENCH_TASKS])[task_of]
    offsets, how = schedule(n, seed, arrivals, rate, burstiness)
    description = {
        "source": "LongBench-like: per-task avg words and #samples from Bai et al., ACL 2024, Table 1 "
                  "(= THUDM/LongBench LongBench/task.md), outputs = LongBench/config/dataset2maxlen.json "
                  "(an upper bound); 16 English and code tasks",
        "task": "chosen with probability proportional to its sample count",
        "context": f"log-normal per task, mean {tokens_per_word} tokens/word x avg words (assumed), "
                   f"sigma {sigma} (assumed), clip {max_context}",
        "output": "the task's max_new_tokens (assumed run to the end)", "arrivals": how}
    labels = [LONGBENCH_TASKS[k].name for k in task_of.tolist()]
    return Workload("longbench", build_requests(prompts, outputs, offsets, seed, labels=labels), seed, description)
