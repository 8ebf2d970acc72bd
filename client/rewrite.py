"""Response rewriting (back-and-forth translation, Nguyen et al. 2024): an aligned model rewrites each
candidate's web text into an assistant's answer to its instruction, conditioned on both.

`rewrite()` is the whole `humpback rewrite` command as an async function, built like `curate`: the
candidates file is read as curate reads it (any JSONL of `instruction`/`output` pairs, gzip'd or not:
augment's candidates, a curated set, another rewrite), each rewrite is appended to a resumable journal
as it arrives (`RewrittenCandidate`: the rewrite in `output`, the text it came from in
`original_output`), and a re-run asks only for what is missing. The output is itself a candidates
file: `curate` scores it, and `humpback export dpo` pairs it with its originals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.completions import chat_choice
from client.corpus import check_input
from client.curate import read_candidates
from client.fanout import Fanout, FanoutConfig
from client.journal import FsyncPolicy
from client.runner import RunSummary, online, open_run, run, served_model
from client.shard import ClusterSettings, ShardSpec, shard_jobs
from client.tasks import Job
from humpback.contracts import BatchRequest, Candidate, ChatRequest, RequestFailed, RewrittenCandidate, content_id, rewrite_messages
from humpback.settings import setting


class RewriteConfig(ClusterSettings):
    """Generation settings of a rewriting run."""

    model: str | None = setting(None, "served rewriter name; unset takes the first model the endpoint lists")
    checkpoint: str | None = setting(None, "version label recorded with each rewrite; unset records the served "
                                           "model's root")
    max_tokens: int = setting(1024, "cap on a rewrite's length; a rewrite cut at the cap is no rewrite (it "
                                    "fails, and a re-run asks again)", ge=1)
    temperature: float = setting(0.0, "sampling temperature: 0 keeps the rewrite close to the text and "
                                      "reproducible", ge=0)
    top_p: float = setting(1.0, "nucleus sampling mass", gt=0, le=1)
    max_field_chars: int = setting(8000, "longest instruction or output rewritten, in characters: a longer "
                                         "candidate goes to <out>.errors.jsonl unsent", ge=1)
    shard: ShardSpec | None = setting(None, "do only shard I of N (0 <= I < N) of the requests, by content id "
                                            "(client.shard); `humpback merge` joins the shards' outputs",
                                      metavar="I/N")
    fsync: FsyncPolicy = setting("interval", "journal durability policy (see client.journal.Journal)")
    progress: bool = setting(True, "show a progress bar on stderr")


def parse_rewrite(data: dict[str, Any]) -> tuple[str, str]:
    """(rewrite, finish_reason) of a chat completion: a rewrite cut at the token cap or empty is none."""
    choice, text = chat_choice(data)
    finish = choice.get("finish_reason") or "stop"
    if finish == "length":
        raise RequestFailed("rewrite truncated at max_tokens", 1)
    if finish != "stop":
        raise RequestFailed(f"unusable finish_reason={finish!r}", 1)
    if not text.strip():
        raise RequestFailed("empty rewrite", 1)
    return text.strip(), finish


@dataclass(frozen=True)
class RewriteTask:
    """Rewrite a candidate's output (a `client.tasks.Task`): ask `model` with `rewrite_messages`; the
    rewrite records `checkpoint` as the rewriter's version."""

    model: str
    checkpoint: str | None
    config: RewriteConfig

    def request(self, cand: Candidate) -> BatchRequest:
        cfg = self.config
        messages = rewrite_messages(cand.instruction, cand.output)
        body = ChatRequest(model=self.model, messages=messages, temperature=cfg.temperature, top_p=cfg.top_p,
                           max_tokens=cfg.max_tokens).body()
        cid = content_id("rewrite", messages, self.model, cfg.temperature, cfg.top_p, cfg.max_tokens)
        return BatchRequest(custom_id=cid, body=body)

    def parse(self, body: dict[str, Any]) -> tuple[str, str]:
        return parse_rewrite(body)

    def record(self, custom_id: str, cand: Candidate, parsed: tuple[str, str]) -> RewrittenCandidate:
        text, finish = parsed
        return RewrittenCandidate(custom_id=custom_id, candidate_id=cand.custom_id, instruction=cand.instruction,
                                  output=text, original_output=cand.output, source=cand.source, model=self.model,
                                  checkpoint=self.checkpoint, finish_reason=finish)


async def rewrite(candidates: str | os.PathLike[str], out: str | os.PathLike[str], fanout: FanoutConfig,
                  config: RewriteConfig | None = None) -> RunSummary:
    """Rewrite the output of every pair of `candidates` into `out` (a journal of `RewrittenCandidate`);
    resumable. The candidates file is checked first (`InputError`, nothing sent), then `out` is locked
    for the run. Side files as augment's: `<out>.errors.jsonl` (lines that are no pair, fields over
    `max_field_chars`, journal lines that are no record), `<out>.failed.jsonl` (retried next run),
    `<out>.summary.json`."""
    cfg = config or RewriteConfig()
    out, candidates = Path(out), Path(candidates)
    check_input(candidates)
    with open_run(out, "rewrite", candidates.stat().st_size, fsync=cfg.fsync, progress=cfg.progress) as opened:
        summary = opened.summary
        async with Fanout(fanout) as fan:
            model, root = await served_model(fan, cfg.model)
            task = RewriteTask(model, cfg.checkpoint or root, cfg)
            summary.extra.model, summary.extra.checkpoint = model, task.checkpoint
            jobs = shard_jobs((Job(task.request(cand), cand, cand.source, pos)
                               for cand, pos in read_candidates(candidates, opened.errors, summary,
                                                                cfg.max_field_chars)),
                              cfg.shard, summary.results)
            await run(task, jobs, online(fan, usage=summary.results), opened.journal, opened.failed, summary,
                      opened.progress, fan.max_inflight)
            summary.extra.retries = fan.retries
    return summary
