"""Runs that span machines: `--shard I/N` splits augment's and curate's requests by content id with no
overlap and no gap, and `merge` joins the shards' outputs and proves they are the unsharded run's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from client.augment import AugmentConfig, augment
from client.curate import CurateConfig, curate
from client.fanout import FanoutConfig
from client.merge import merge
from client.shard import Shard, in_shard
from humpback.cli import main
from humpback.contracts import InputError, content_id
from tests.client.fake_server import FakeServer
from tests.subcommand import subcommand

IDS = [content_id("shard test", i) for i in range(2000)]


def _fan(url: str) -> FanoutConfig:
    return FanoutConfig(endpoints=[url], backoff_base=0.01, backoff_max=0.05)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_split_ids_with_no_overlap_and_no_gap(count: int) -> None:
    parts = [[cid for cid in IDS if in_shard(cid, Shard(i, count))] for i in range(count)]
    assert sorted(cid for part in parts for cid in part) == sorted(IDS)  # no gap, no overlap
    assert all(len(part) > 0.8 * len(IDS) / count for part in parts)  # and even
    assert parts == [[cid for cid in IDS if in_shard(cid, Shard.parse(f"{i}/{count}"))] for i in range(count)]
    assert all(in_shard(cid, None) for cid in IDS)


def test_shard_is_written_i_of_n() -> None:
    assert Shard.parse(" 2/4") == Shard(2, 4) and str(Shard(2, 4)) == "2/4"
    assert AugmentConfig(shard="1/3").shard == Shard(1, 3) == CurateConfig(shard="1/3").shard
    assert AugmentConfig(shard="1/3").model_dump(mode="json")["shard"] == "1/3"
    for bad in ("4/4", "0/0", "-1/2", "1", "a/b"):
        with pytest.raises(ValidationError, match="shard"):
            AugmentConfig(shard=bad)
    with pytest.raises(InputError, match="not hex"):
        in_shard("not-an-id", Shard(0, 2))


def test_the_shard_flag_is_generated_and_checked(corpus: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert "--shard" in subcommand("augment").format_help() and "--shard" in subcommand("curate").format_help()
    out = tmp_path / "cands.jsonl"
    assert main(["augment", "--corpus", str(corpus), "--out", str(out), "--shard", "3/3", "--no-progress"]) == 2
    assert "humpback: error: shard: " in capsys.readouterr().err and not out.exists()


async def _augment_shards(fake: FakeServer, corpus: Path, tmp_path: Path, count: int,
                          config: AugmentConfig) -> list[Path]:
    outs = []
    for i in range(count):
        out = tmp_path / f"shard{i}" / "cands.jsonl"
        summary = await augment([corpus], out, _fan(fake.url), config.model_copy(update={"shard": Shard(i, count)}))
        assert summary.extra.shard == f"{i}/{count}"
        assert summary.results["written"] + summary.results["other_shard"] == (config.limit or 30)
        outs.append(out)
    return outs


async def test_three_shards_merge_into_the_unsharded_run(fake: FakeServer, corpus: Path, tmp_path: Path) -> None:
    # --limit is the unsharded run's: the first 20 kept segments overall, of which each shard does its own.
    cfg = AugmentConfig(progress=False, limit=20)
    whole = tmp_path / "whole.jsonl"
    await augment([corpus], whole, _fan(fake.url), cfg)
    calls = fake.requests["/v1/chat/completions"]
    shards = await _augment_shards(fake, corpus, tmp_path, 3, cfg)
    assert fake.requests["/v1/chat/completions"] - calls == 20  # each request asked by one shard only
    assert all(_ids(s) for s in shards)
    out = tmp_path / "merged.jsonl"
    summary = merge(shards, out, [corpus], AugmentConfig(limit=20))
    assert sorted(_ids(out)) == sorted(_ids(whole)) and len(set(_ids(out))) == 20
    assert sorted(out.read_text().splitlines()) == sorted(whole.read_text().splitlines())
    assert (summary.results["written"], summary.results["expected"], summary.results["missing"],
            summary.results["unexpected"], summary.extra.model) == (20, 20, 0, 0, "fake")
    assert not (tmp_path / "merged.missing.jsonl").exists()
    # Without the limit, the unsharded run asks for 10 more segments: no shard holds them.
    assert merge(shards, out, [corpus]).results["missing"] == 10


async def test_a_missing_shard_is_reported_with_its_ids(fake: FakeServer, corpus: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    shards = await _augment_shards(fake, corpus, tmp_path, 3, AugmentConfig(progress=False))
    out = tmp_path / "merged.jsonl"
    argv = ["merge", "--out", str(out), "--corpus", str(corpus)]
    assert main([*argv, str(shards[0]), str(shards[1])]) == 3
    summary = json.loads(capsys.readouterr().err)
    assert summary["results"]["missing"] == len(_ids(shards[2])) == 30 - summary["results"]["written"]
    missing = [json.loads(line) for line in (tmp_path / "merged.missing.jsonl").read_text().splitlines()]
    assert sorted(m["custom_id"] for m in missing) == sorted(_ids(shards[2]))
    assert all(m["reason"] == "in no shard's output" and m["source"]["path"] == str(corpus) for m in missing)
    # A shard whose request failed: the merge names the failure.
    fake.script.append("400")
    failed = await augment([corpus], tmp_path / "again" / "cands.jsonl", _fan(fake.url),
                           AugmentConfig(progress=False, resample=0, shard=Shard(2, 3)))
    assert failed.results["failed"] == 1
    assert main([*argv, str(shards[0]), str(shards[1]), str(tmp_path / "again" / "cands.jsonl")]) == 3
    missing = [json.loads(line) for line in (tmp_path / "merged.missing.jsonl").read_text().splitlines()]
    assert len(missing) == 1 and missing[0]["reason"].startswith(f"failed in {tmp_path / 'again' / 'cands.jsonl'}: ")
    assert main([*argv, *map(str, shards)]) == 0
    assert not (tmp_path / "merged.missing.jsonl").exists() and len(set(_ids(out))) == 30


async def test_duplicates_are_written_once_and_conflicts_refused(
        fake: FakeServer, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = await _augment_shards(fake, corpus, tmp_path, 2, AugmentConfig(progress=False))
    copy = tmp_path / "copy.jsonl"
    shutil.copy(shards[0], copy)
    out = tmp_path / "merged.jsonl"
    summary = merge([*shards, copy], out)
    assert summary.results["duplicates"] == len(_ids(copy)) and len(_ids(out)) == 30 == len(set(_ids(out)))
    lines = copy.read_text().splitlines()
    changed = json.loads(lines[2])
    changed["instruction"] = "Something else entirely?"
    copy.write_text("\n".join([*lines[:2], json.dumps(changed), *lines[3:]]) + "\n")
    out.unlink()
    where = f"{copy} line 3: custom_id {changed['custom_id']} is also in {shards[0]} line 3"
    with pytest.raises(InputError, match=re.escape(where)):
        merge([*shards, copy], out)
    assert main(["merge", "--out", str(out), *map(str, shards), str(copy)]) == 2
    assert "different content" in capsys.readouterr().err and not out.exists()


async def test_lines_that_are_no_record_are_skipped_and_reported(fake: FakeServer, corpus: Path,
                                                                 tmp_path: Path) -> None:
    shards = await _augment_shards(fake, corpus, tmp_path, 2, AugmentConfig(progress=False))
    lines = shards[1].read_text().splitlines(keepends=True)
    shards[1].write_text("".join(lines[:-1]) + lines[-1][:30])  # a shard killed mid-write
    summary = merge(shards, tmp_path / "merged.jsonl", [corpus])
    assert summary.input["corrupt_lines"] == 1 and summary.results["missing"] == 1
    errors = [json.loads(x) for x in (tmp_path / "merged.errors.jsonl").read_text().splitlines()]
    assert [(e["source"], e["line"]) for e in errors] == [(str(shards[1]), len(lines))]


async def test_curate_shards_merge_into_the_unsharded_scores(fake: FakeServer, corpus: Path, tmp_path: Path) -> None:
    cands = tmp_path / "cands.jsonl"
    await augment([corpus], cands, _fan(fake.url), AugmentConfig(progress=False))
    cfg = CurateConfig(progress=False, histogram=False)
    await curate(cands, tmp_path / "whole.jsonl", _fan(fake.url), cfg)
    scored = []
    for i in range(2):
        summary = await curate(cands, tmp_path / f"s{i}" / "curated.jsonl", _fan(fake.url),
                               cfg.model_copy(update={"shard": Shard(i, 2)}))
        assert summary.results["written"] + summary.results["other_shard"] == 30
        scored.append(tmp_path / f"s{i}" / "curated.scored.jsonl")
    merged = tmp_path / "merged.scored.jsonl"
    assert merge(scored, merged).results["written"] == 30
    assert sorted(merged.read_text().splitlines()) == sorted((tmp_path / "whole.scored.jsonl").read_text().splitlines())
    # Select once from every shard's scores: all are in the merged journal, so nothing is sent.
    calls = fake.requests["/v1/chat/completions"]
    summary = await curate(cands, tmp_path / "curated.jsonl", _fan(fake.url),
                           cfg.model_copy(update={"scored": merged, "top_fraction": 0.25}))
    assert fake.requests["/v1/chat/completions"] == calls and summary.results["skipped_done"] == 30
    assert summary.extra.scored_total == 30


async def test_without_the_corpus_the_shards_own_summaries_prove_the_set(
        fake: FakeServer, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No --corpus: a shard missing from the I/N set, a shard given twice, or one whose last run failed
    requests, is found from the shards' summaries, and the merge exits 3."""
    shards = await _augment_shards(fake, corpus, tmp_path, 3, AugmentConfig(progress=False))
    out = tmp_path / "merged.jsonl"
    argv = ["merge", "--out", str(out)]
    assert main([*argv, *map(str, shards)]) == 0
    summary = json.loads(capsys.readouterr().err)
    assert summary["extra"]["shard_set"]["count"] == 3 and summary["results"]["missing_shards"] == 0

    assert main([*argv, str(shards[0]), str(shards[2])]) == 3
    summary = json.loads(capsys.readouterr().err)
    assert summary["results"]["missing_shards"] == 1 and summary["extra"]["shard_set"]["missing"] == [1]

    again = tmp_path / "again" / "cands.jsonl"
    shutil.copytree(shards[1].parent, again.parent)
    assert main([*argv, *map(str, shards), str(again)]) == 3
    assert json.loads(capsys.readouterr().err)["extra"]["shard_set"]["repeated"] == [1]

    fake.script.append("400")
    failed = await augment([corpus], tmp_path / "failing" / "cands.jsonl", _fan(fake.url),
                           AugmentConfig(progress=False, resample=0, shard=Shard(2, 3)))
    assert failed.results["failed"] == 1
    assert main([*argv, str(shards[0]), str(shards[1]), str(tmp_path / "failing" / "cands.jsonl")]) == 3
    assert json.loads(capsys.readouterr().err)["results"]["shards_failed"] == 1


async def test_curate_shards_are_proven_by_their_summaries_too(fake: FakeServer, corpus: Path, tmp_path: Path) -> None:
    from client.merge import proven

    cands = tmp_path / "cands.jsonl"
    await augment([corpus], cands, _fan(fake.url), AugmentConfig(progress=False))
    cfg = CurateConfig(progress=False, histogram=False)
    scored = []
    for i in range(3):
        await curate(cands, tmp_path / f"s{i}" / "curated.jsonl", _fan(fake.url),
                     cfg.model_copy(update={"shard": Shard(i, 3)}))
        scored.append(tmp_path / f"s{i}" / "curated.scored.jsonl")
    assert proven(merge(scored, tmp_path / "merged.scored.jsonl"))
    short = merge(scored[:2], tmp_path / "merged.scored.jsonl")
    assert not proven(short) and short.extra.shard_set.missing == [2]


async def test_records_that_do_not_belong_are_not_merged_and_the_merge_fails(
        fake: FakeServer, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Records of another run (here: shard 1's, appended to shard 0's file) are not shard 0's: they are
    set aside in the errors file, and the merge exits 3, with or without the corpus."""
    shards = await _augment_shards(fake, corpus, tmp_path, 2, AugmentConfig(progress=False))
    stray = shards[1].read_text().splitlines(keepends=True)[:3]
    with open(shards[0], "a") as f:
        f.writelines(stray)
    out = tmp_path / "merged.jsonl"
    assert main(["merge", "--out", str(out), str(shards[0])]) == 3
    summary = json.loads(capsys.readouterr().err)
    assert summary["results"]["foreign"] == 3 and summary["results"]["missing_shards"] == 1
    assert not set(_ids(out)) & {json.loads(x)["custom_id"] for x in stray}
    errors = [json.loads(x) for x in (tmp_path / "merged.errors.jsonl").read_text().splitlines()]
    assert len(errors) == 3 and all("is not in shard 0/2" in e["reason"] for e in errors)
    # With the corpus, the records of a run with other settings are unexpected: exit 3 as well.
    other = tmp_path / "other" / "cands.jsonl"
    await augment([corpus], other, _fan(fake.url), AugmentConfig(progress=False, temperature=0.3))
    assert main(["merge", "--out", str(out), "--corpus", str(corpus), *map(str, shards[:1]), str(other)]) == 3
    assert json.loads(capsys.readouterr().err)["results"]["unexpected"] > 0
