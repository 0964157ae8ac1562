"""The `slurmexecutor` command's main jobs: count-reads and demo (cli.py parses)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from slurmexecutor.executor import SlurmExecutor
from slurmexecutor.schedulers.script import SBATCH_OPTIONS


def resources_from(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in SBATCH_OPTIONS
            if getattr(args, name, None) is not None}


def count_reads_command(args: argparse.Namespace) -> int:
    from slurmexecutor.apps.countreads import read_bed, write_counts_tsv

    regions = read_bed(args.regions)
    with _executor(args) as executor:
        counts = count_reads(args, executor, args.bam, regions)
    if args.output:
        write_counts_tsv(counts, regions, args.output)
        print(f"{len(regions)} regions, {sum(counts.values())} reads -> {args.output}",
              file=sys.stderr)
    else:
        write_counts_tsv(counts, regions, sys.stdout)
    return 0


def _executor(args: argparse.Namespace) -> SlurmExecutor:
    return SlurmExecutor(args.folder, backend=args.backend, setup=args.setup,
                         sbatch_extra=args.sbatch_extra, **resources_from(args))


def count_reads(args: argparse.Namespace, executor: SlurmExecutor, bam: Path,
                regions: list):
    """Count reads per region through map_reduce, one array task per fraction."""
    from slurmexecutor.apps.countreads import check_bam, count_region_reads
    from slurmexecutor.mapreduce import map_reduce

    bam = bam.resolve()
    check_bam(bam)
    print(f"counting reads in {len(regions)} regions of {bam.name} in "
          f"{min(args.fractions, len(regions))} fractions on the {executor.backend.name} "
          f"backend (run {executor.run_id})", file=sys.stderr)
    return map_reduce(count_region_reads, regions, args.fractions, sum, str(bam),
                      executor=executor, progress=args.progress)


def demo_command(args: argparse.Namespace) -> int:
    from slurmexecutor.apps.countreads import (
        count_reads_serial,
        make_demo_data,
        read_bed,
        write_counts_tsv,
    )

    started = time.monotonic()
    data = make_demo_data(args.dir)
    print(f"demo data in {args.dir}/: {data.bam.name}, {data.promoters_bed.name}, "
          f"{data.genes_bed.name}", file=sys.stderr)
    with _executor(args) as executor:
        for bed in (data.promoters_bed, data.genes_bed):
            regions = read_bed(bed)
            counts = count_reads(args, executor, data.bam, regions)
            output = args.dir / f"{bed.stem}.counts.tsv"
            write_counts_tsv(counts, regions, output)
            same = counts == count_reads_serial(data.bam, regions)
            print(f"{bed.stem}: {len(regions)} regions, {sum(counts.values())} reads -> "
                  f"{output} (equals a single-process pysam count: {'yes' if same else 'NO'})")
            if not same:
                return 1
    print(f"done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


