"""Count sequencing reads per genomic region: a small, realistic demo workload.

Bioinformaticians often count the reads of a BAM file that overlap each region
of a BED file.  The work splits naturally by region, so it is a good showcase
for running many small tasks on a cluster::

    regions = read_bed(demo.genes_bed)
    total = Counter()
    for counts in executor.map(count_region_reads, regions, repeat(str(demo.bam))):
        total.update(counts)
    assert total == count_reads_serial(demo.bam, regions)

Coordinates are 0-based and half-open throughout, as in BED files and pysam.
Reads are counted with ``pysam.AlignmentFile.count`` and its default
``read_callback="nofilter"``: every alignment overlapping the region counts,
including secondary, supplementary, duplicate and QC-failed ones.  Real
analyses usually filter these; the synthetic data written by
:func:`make_demo_data` has none of them, so the choice does not matter there.

Region names are the keys of the returned counters.  If two regions share a
name, their counts add up (in the serial loop as in a sum of per-region
counters), and :func:`write_counts_tsv` writes that name once.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import pysam

__all__ = [
    "DemoData",
    "Region",
    "count_reads_serial",
    "count_region_reads",
    "make_demo_data",
    "read_bed",
    "write_counts_tsv",
]

StrPath = str | os.PathLike[str]

READ_LENGTH = 100
PROMOTER_LENGTH = 1_000
_GENE_LENGTH_RANGE = (500, 5_000)
_DEMO_FORMAT_VERSION = 1  # bump when the generated data changes for a given seed


@dataclass(frozen=True)
class Region:
    """A named genomic interval, 0-based and half-open like a BED line."""

    name: str
    contig: str
    start: int
    end: int


# --------------------------------------------------------------------------- BED


def read_bed(path: StrPath) -> list[Region]:
    """Read the regions of a BED file, in file order.

    Blank lines and ``#``, ``track`` and ``browser`` lines are skipped.  The name
    is the 4th column, or ``contig:start-end`` if it is absent or ``.``.
    Raises ValueError, naming the file and line, for a malformed line.
    """
    regions = []
    with open(path, encoding="utf-8") as bed:
        for lineno, line in enumerate(bed, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            try:
                regions.append(_parse_bed_fields(fields))
            except ValueError as exc:
                raise ValueError(f"{os.fspath(path)}, line {lineno}: {exc}: {line!r}") from None
    return regions


def _parse_bed_fields(fields: list[str]) -> Region:
    if len(fields) < 3:
        raise ValueError(f"expected at least 3 columns, got {len(fields)}")
    contig = fields[0].strip()
    try:
        start, end = int(fields[1]), int(fields[2])
    except ValueError:
        raise ValueError("start and end must be integers") from None
    if not contig:
        raise ValueError("empty contig name")
    if start < 0 or end < start:
        raise ValueError(f"invalid interval {start}-{end}")
    name = fields[3].strip() if len(fields) > 3 else ""
    if name in ("", "."):
        name = f"{contig}:{start}-{end}"
    return Region(name, contig, start, end)


def _write_bed(path: Path, regions: Iterable[Region]) -> None:
    lines = (f"{r.contig}\t{r.start}\t{r.end}\t{r.name}\n" for r in regions)
    _atomic_write_text(path, "".join(lines))


# ----------------------------------------------------------------------- counting


def check_bam(path: StrPath) -> None:
    """Fail early, on the client, with a clear error: the BAM must exist and be indexed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BAM file not found: {path}")
    try:
        with pysam.AlignmentFile(str(path), "rb") as bam:
            if not bam.has_index():
                raise ValueError(f"{path} has no index: run `samtools index {path}` "
                                 "(or pysam.index) first")
    except (OSError, ValueError) as error:
        if "has no index" in str(error):
            raise
        raise ValueError(f"{path} is not a readable BAM file: {error}") from error


def _open_bam(path: StrPath) -> pysam.AlignmentFile:
    """Return an open BAM file, reused across calls in this process.

    The process id is part of the cache key: a forked child must not share the
    parent's handle, whose file offset the two processes would fight over.
    """
    return _open_bam_cached(os.fspath(path), os.getpid())


@functools.lru_cache(maxsize=4)
def _open_bam_cached(path: str, pid: int) -> pysam.AlignmentFile:
    return pysam.AlignmentFile(path, "rb")


def count_region_reads(region: Region, bam_path: StrPath) -> Counter[str]:
    """Count the reads of an indexed BAM overlapping *region*.

    Returns ``Counter({region.name: n})``, so the results of many calls can be
    added up.  The BAM is opened once per process and kept open.
    """
    bam = _open_bam(bam_path)
    return Counter({region.name: bam.count(region.contig, region.start, region.end)})


def count_reads_serial(bam_path: StrPath, regions: Iterable[Region]) -> Counter[str]:
    """Count reads per region in a plain loop: the reference for parallel runs."""
    counts: Counter[str] = Counter()
    with pysam.AlignmentFile(os.fspath(bam_path), "rb") as bam:
        for region in regions:
            counts[region.name] += bam.count(region.contig, region.start, region.end)
    return counts


def write_counts_tsv(
    counts: Counter[str], regions: Iterable[Region], path_or_file: StrPath | TextIO
) -> None:
    """Write ``name<TAB>count`` lines in region order, then ``total<TAB>N``.

    Each name is written once; names of *counts* that are not in *regions* are
    ignored, and regions missing from *counts* are written with 0.
    """
    names = dict.fromkeys(region.name for region in regions)
    lines = [f"{name}\t{counts[name]}\n" for name in names]
    lines.append(f"total\t{sum(counts[name] for name in names)}\n")
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "w", encoding="utf-8") as out:
            out.writelines(lines)
    else:
        path_or_file.writelines(lines)


# ---------------------------------------------------------------------- demo data


@dataclass(frozen=True)
class DemoData:
    """Paths of the files written by :func:`make_demo_data`."""

    bam: Path
    promoters_bed: Path
    genes_bed: Path


def make_demo_data(
    folder: StrPath,
    *,
    n_reads: int = 20_000,
    n_contigs: int = 2,
    contig_length: int = 200_000,
    n_genes: int = 200,
    seed: int = 0,
) -> DemoData:
    """Write a synthetic indexed BAM and two BED files into *folder*.

    The BAM holds *n_reads* uniformly placed ``100M`` reads, split evenly over
    contigs ``chr1``, ``chr2``, ...  ``genes.bed`` holds *n_genes* random genes
    (``gene0001``, ...) and ``promoters.bed`` the 1 kb upstream of each start,
    clipped at 0 (``gene0001_promoter``, ...).  Output depends only on the
    arguments.  Files already written with the same arguments, as recorded in
    ``manifest.json``, are reused; the manifest is written last, so an
    interrupted run is simply redone.
    """
    if n_reads < 0 or n_genes < 0:
        raise ValueError("n_reads and n_genes must not be negative")
    if n_contigs < 1:
        raise ValueError("n_contigs must be at least 1")
    if contig_length <= READ_LENGTH:
        raise ValueError(f"contig_length must exceed the read length ({READ_LENGTH})")

    folder = Path(folder)
    demo = DemoData(
        bam=folder / "reads.bam",
        promoters_bed=folder / "promoters.bed",
        genes_bed=folder / "genes.bed",
    )
    manifest_path = folder / "manifest.json"
    manifest = {
        "format_version": _DEMO_FORMAT_VERSION,
        "params": {
            "n_reads": n_reads,
            "n_contigs": n_contigs,
            "contig_length": contig_length,
            "n_genes": n_genes,
            "seed": seed,
        },
    }
    if _manifest_matches(manifest_path, manifest, demo):
        return demo

    folder.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    started = time.perf_counter()
    contigs = [f"chr{i}" for i in range(1, n_contigs + 1)]
    rng = random.Random(seed)
    _write_demo_bam(demo.bam, contigs, contig_length, n_reads, rng, seed)
    genes = _random_genes(contigs, contig_length, n_genes, rng)
    _write_bed(demo.genes_bed, genes)
    _write_bed(demo.promoters_bed, map(_promoter, genes))
    manifest["seconds_to_generate"] = round(time.perf_counter() - started, 3)
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return demo


def _manifest_matches(manifest_path: Path, expected: dict, demo: DemoData) -> bool:
    try:
        found = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    keys = ("format_version", "params")
    files = [*asdict(demo).values(), Path(f"{demo.bam}.bai")]
    return (
        isinstance(found, dict)
        and all(found.get(key) == expected[key] for key in keys)
        and all(path.is_file() for path in files)
    )


def _write_demo_bam(
    path: Path, contigs: list[str], contig_length: int, n_reads: int, rng: random.Random, seed: int
) -> None:
    """Write coordinate-sorted reads (sorted as generated, no sort step), then index."""
    header = {
        "HD": {"VN": "1.6", "SO": "coordinate"},
        "SQ": [{"SN": contig, "LN": contig_length} for contig in contigs],
        "CO": [f"synthetic reads from slurmexecutor.apps.countreads, seed={seed}"],
    }
    sequences = ["".join(rng.choices("ACGT", k=READ_LENGTH)) for _ in range(64)]
    name_width = len(str(max(n_reads - 1, 0)))
    max_start = contig_length - READ_LENGTH
    tmp = path.with_name(f".{path.name}.tmp")
    read_index = 0
    with pysam.AlignmentFile(str(tmp), "wb", header=header, threads=2) as bam:
        # One segment, updated and written per read: ~3x faster than new objects.
        read = pysam.AlignedSegment(bam.header)
        read.cigartuples = [(0, READ_LENGTH)]  # 100M
        for contig_id in range(len(contigs)):
            n_here = n_reads // len(contigs) + (contig_id < n_reads % len(contigs))
            starts = sorted(rng.randrange(max_start + 1) for _ in range(n_here))
            read.reference_id = contig_id
            for start in starts:
                read.query_name = f"read{read_index:0{name_width}d}"
                read.query_sequence = sequences[read_index % len(sequences)]
                read.reference_start = start
                read.flag = 16 if rng.random() < 0.5 else 0  # strand
                read.mapping_quality = rng.randrange(61)
                bam.write(read)
                read_index += 1
    pysam.index(str(tmp), f"{tmp}.bai")
    os.replace(tmp, path)
    os.replace(f"{tmp}.bai", f"{path}.bai")


def _random_genes(
    contigs: list[str], contig_length: int, n_genes: int, rng: random.Random
) -> list[Region]:
    """Return *n_genes* random genes sorted by position, named in that order."""
    max_length = contig_length - 1  # genes start at >= 1, so promoters are never empty
    min_length = min(_GENE_LENGTH_RANGE[0], max_length)
    intervals = []
    for _ in range(n_genes):
        contig_id = rng.randrange(len(contigs))
        length = rng.randint(min_length, min(_GENE_LENGTH_RANGE[1], max_length))
        start = rng.randint(1, contig_length - length)
        intervals.append((contig_id, start, start + length))
    intervals.sort()
    width = max(4, len(str(n_genes)))
    return [
        Region(f"gene{i:0{width}d}", contigs[contig_id], start, end)
        for i, (contig_id, start, end) in enumerate(intervals, start=1)
    ]


def _promoter(gene: Region) -> Region:
    start = max(0, gene.start - PROMOTER_LENGTH)
    return Region(f"{gene.name}_promoter", gene.contig, start, gene.start)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
