"""Tests for the read-counting demo workload in slurmexecutor.apps.countreads."""

from __future__ import annotations

import io
import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import pysam
import pytest

from slurmexecutor.apps import countreads
from slurmexecutor.apps.countreads import (
    Region,
    count_reads_serial,
    count_region_reads,
    make_demo_data,
    read_bed,
    write_counts_tsv,
)


@pytest.fixture(autouse=True)
def _fresh_bam_cache():
    countreads._open_bam_cached.cache_clear()
    yield
    countreads._open_bam_cached.cache_clear()


@pytest.fixture
def small_demo(tmp_path: Path) -> countreads.DemoData:
    return make_demo_data(tmp_path / "demo", n_reads=3_000, n_genes=30, seed=1)


@pytest.fixture
def tiny_bam(tmp_path: Path) -> Path:
    """A BAM with five reads at known places: chr1 0-100, 150-250, 220-270, 900-1000; chr2 5-15."""
    header = {"HD": {"VN": "1.6", "SO": "coordinate"},
              "SQ": [{"SN": "chr1", "LN": 1_000}, {"SN": "chr2", "LN": 500}]}
    reads = [(0, 0, 100), (0, 150, 100), (0, 220, 50), (0, 900, 100), (1, 5, 10)]
    path = tmp_path / "tiny.bam"
    with pysam.AlignmentFile(str(path), "wb", header=header) as bam:
        for i, (contig_id, start, length) in enumerate(reads):
            read = pysam.AlignedSegment(bam.header)
            read.query_name = f"r{i}"
            read.reference_id = contig_id
            read.reference_start = start
            read.cigartuples = [(0, length)]
            read.query_sequence = "A" * length
            read.mapping_quality = 60
            bam.write(read)
    pysam.index(str(path))
    return path


# --------------------------------------------------------------------------- BED


def test_read_bed_parses_regions_and_skips_headers(tmp_path: Path) -> None:
    bed = tmp_path / "regions.bed"
    bed.write_text(
        "track name=test\n"
        "browser position chr1:1-100\n"
        "# a comment\n"
        "\n"
        "chr1\t10\t20\tgeneA\t0\t+\n"
        "chr2\t0\t5\r\n"
        "chr1\t30\t40\t.\n"
        "chr3 7 9 spaced\n"
    )
    assert read_bed(bed) == [
        Region("geneA", "chr1", 10, 20),
        Region("chr2:0-5", "chr2", 0, 5),
        Region("chr1:30-40", "chr1", 30, 40),
        Region("spaced", "chr3", 7, 9),
    ]


@pytest.mark.parametrize(
    "bad_line",
    ["chr1\t10\n", "chr1\tten\t20\n", "chr1\t20\t10\n", "chr1\t-1\t10\n", "\t1\t2\n"],
)
def test_read_bed_rejects_malformed_line_with_file_and_line_number(
    tmp_path: Path, bad_line: str
) -> None:
    bed = tmp_path / "bad.bed"
    bed.write_text("# header\nchr1\t0\t10\tok\n" + bad_line)
    with pytest.raises(ValueError, match=r"bad\.bed, line 3: "):
        read_bed(bed)


# ---------------------------------------------------------------------- demo data


def test_demo_data_is_deterministic_and_indexed(tmp_path: Path) -> None:
    first = make_demo_data(tmp_path / "a", n_reads=2_000, n_genes=25, seed=7)
    second = make_demo_data(tmp_path / "b", n_reads=2_000, n_genes=25, seed=7)
    other = make_demo_data(tmp_path / "c", n_reads=2_000, n_genes=25, seed=8)

    assert first.genes_bed.read_text() == second.genes_bed.read_text()
    assert first.promoters_bed.read_text() == second.promoters_bed.read_text()
    assert first.genes_bed.read_text() != other.genes_bed.read_text()

    def records(bam_path: Path) -> list[str]:
        with pysam.AlignmentFile(str(bam_path)) as bam:
            assert bam.has_index()
            assert bam.mapped == 2_000
            return [read.to_string() for read in bam.fetch()]

    reads = records(first.bam)
    assert reads == records(second.bam)
    assert reads != records(other.bam)
    assert len(reads) == 2_000


def test_demo_data_has_sorted_reads_and_matching_beds(small_demo: countreads.DemoData) -> None:
    with pysam.AlignmentFile(str(small_demo.bam)) as bam:
        assert bam.references == ("chr1", "chr2")
        positions = [(read.reference_id, read.reference_start) for read in bam.fetch()]
        assert positions == sorted(positions)
        assert all(read.cigarstring == "100M" for read in bam.fetch())

    genes = read_bed(small_demo.genes_bed)
    promoters = read_bed(small_demo.promoters_bed)
    assert [g.name for g in genes] == [f"gene{i:04d}" for i in range(1, 31)]
    assert [p.name for p in promoters] == [f"{g.name}_promoter" for g in genes]
    for gene, promoter in zip(genes, promoters, strict=True):
        assert 0 < gene.start < gene.end <= 200_000
        assert promoter.contig == gene.contig
        assert promoter.end == gene.start
        assert promoter.start == max(0, gene.start - 1_000)


def test_demo_data_is_reused_when_parameters_match(tmp_path: Path) -> None:
    demo = make_demo_data(tmp_path, n_reads=500, n_genes=5)
    stamp = demo.bam.stat().st_mtime_ns
    assert make_demo_data(tmp_path, n_reads=500, n_genes=5).bam.stat().st_mtime_ns == stamp

    make_demo_data(tmp_path, n_reads=600, n_genes=5)
    with pysam.AlignmentFile(str(demo.bam)) as bam:
        assert bam.mapped == 600


def test_demo_data_default_size_is_quick(tmp_path: Path) -> None:
    demo = make_demo_data(tmp_path)
    manifest = (tmp_path / "manifest.json").read_text()
    assert '"seconds_to_generate"' in manifest
    assert len(read_bed(demo.genes_bed)) == 200


# ----------------------------------------------------------------------- counting


def test_known_counts_on_tiny_bam(tiny_bam: Path) -> None:
    regions = [
        Region("first_read", "chr1", 0, 100),
        Region("boundary_gap", "chr1", 100, 150),  # half-open: touches no read
        Region("two_reads", "chr1", 99, 151),
        Region("overlap", "chr1", 200, 230),
        Region("last_base", "chr1", 999, 1_000),
        Region("empty", "chr1", 500, 500),
        Region("other_contig", "chr2", 0, 6),
    ]
    expected = Counter(first_read=1, boundary_gap=0, two_reads=2, overlap=2,
                       last_base=1, empty=0, other_contig=1)
    assert count_reads_serial(tiny_bam, regions) == expected
    for region in regions:
        assert count_region_reads(region, str(tiny_bam)) == Counter({region.name: expected[region.name]})


def test_region_counts_sum_to_serial(small_demo: countreads.DemoData) -> None:
    regions = read_bed(small_demo.genes_bed) + read_bed(small_demo.promoters_bed)
    total: Counter[str] = Counter()
    for region in regions:
        total.update(count_region_reads(region, str(small_demo.bam)))
    serial = count_reads_serial(small_demo.bam, regions)
    assert total == serial
    assert sum(serial.values()) > 0
    assert set(serial) == {region.name for region in regions}


def test_bam_is_opened_once_per_process(
    small_demo: countreads.DemoData, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real_alignment_file = pysam.AlignmentFile

    def counting_alignment_file(path, *args, **kwargs):
        opened.append(path)
        return real_alignment_file(path, *args, **kwargs)

    monkeypatch.setattr(countreads.pysam, "AlignmentFile", counting_alignment_file)
    for region in read_bed(small_demo.genes_bed):
        count_region_reads(region, small_demo.bam)  # Path and str share the cache entry
        count_region_reads(region, str(small_demo.bam))
    assert opened == [str(small_demo.bam)]

    # A forked child has another pid and must open its own handle.
    monkeypatch.setattr(countreads.os, "getpid", lambda: -1)
    count_region_reads(read_bed(small_demo.genes_bed)[0], small_demo.bam)
    assert len(opened) == 2


def test_forked_workers_match_serial(small_demo: countreads.DemoData) -> None:
    regions = read_bed(small_demo.genes_bed)
    count_region_reads(regions[0], str(small_demo.bam))  # parent handle, inherited on fork
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        results = pool.map(count_region_reads, regions, repeat(str(small_demo.bam)), chunksize=4)
        total = sum(results, Counter())
    assert total == count_reads_serial(small_demo.bam, regions)


# ---------------------------------------------------------------------------- TSV


def test_write_counts_tsv_format(tmp_path: Path) -> None:
    regions = [Region("b", "chr1", 0, 10), Region("a", "chr1", 5, 15),
               Region("zero", "chr2", 0, 1), Region("b", "chr1", 20, 30)]
    counts = Counter(a=3, b=5, not_a_region=100)
    expected = "b\t5\na\t3\nzero\t0\ntotal\t8\n"

    path = tmp_path / "counts.tsv"
    write_counts_tsv(counts, regions, path)
    assert path.read_text() == expected

    buffer = io.StringIO()
    write_counts_tsv(counts, regions, buffer)
    assert buffer.getvalue() == expected
