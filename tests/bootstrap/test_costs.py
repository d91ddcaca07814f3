"""Cost guardrails: real prices, the estimate before a launch, ``--max-cost`` refusing or shortening.

Where the prices come from in these tests, and why:

- On-demand and storage prices: moto has no Price List (``pricing``) service, so a real boto3 ``pricing`` client
  is served by botocore's ``Stubber`` with GetProducts answers in the API's documented shape
  (tests/bootstrap/data/pricing_get_products.json says where the shape and the prices come from). The Stubber
  also checks the exact filters rawvm sends. botocore's own documented GetProducts example is parsed verbatim.
- Spot prices: moto serves DescribeSpotPriceHistory (server mode, over HTTP): $0.00001 per hour in every zone
  that offers the type, which is what the by-hand figures below use.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.loaders import Loader
from botocore.stub import Stubber
from rawvm import clusters, cost_guard, costs
from rawvm.cli import main
from rawvm.errors import RawvmError, UsageError
from rawvm.options import BACKSTOP_GRACE
from rawvm.providers.aws import prices as aws_prices
from rawvm.providers.aws.prices import PriceBook, on_demand_usd
from rawvm.providers.aws.provider import AwsProvider
from rawvm.providers.base import Machine, MachineSpec

from tests.bootstrap.test_aws_moto import REGION, MotoServer, iter_tags, session
from tests.bootstrap.test_aws_provider import make_provider, make_spec

DATA = json.loads((Path(__file__).parent / "data" / "pricing_get_products.json").read_text())
C7I_LARGE = 0.08925  # USD/hour, Linux on-demand, us-east-1 (by hand from the recorded answer)
GP3 = 0.08  # USD/GB-month, us-east-1
MOTO_SPOT = 0.00001  # what moto answers for every spot price


def pricing_client() -> Any:
    return session().client("pricing", region_name=aws_prices.PRICING_REGION)


def expect_products(stubber: Stubber, answer: str, filters: list[dict[str, str]], service: str = "AmazonEC2") -> None:
    stubber.add_response(
        "get_products", DATA[answer], {"ServiceCode": service, "Filters": filters, "FormatVersion": "aws_v1"}
    )


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def xdg_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One instance-type cache for the module: moto takes seconds to list every EC2 type."""
    return tmp_path_factory.mktemp("xdg-cache")


def types_dir(xdg_cache: Path) -> Path:
    return xdg_cache / "rawvm" / "instance-types"  # where rawvm_images caches them under XDG_CACHE_HOME


# -- parsing the Price List ------------------------------------------------------------------------------------


def test_botocore_documented_get_products_example_parses_verbatim() -> None:
    example = Loader().load_service_model("pricing", "examples-1")["examples"]["GetProducts"][0]["output"]
    assert on_demand_usd(example["PriceList"], unit="GB-Mo") == pytest.approx(0.138)
    assert on_demand_usd(example["PriceList"], unit="Hrs") is None  # a storage price is no hourly price


def test_only_the_on_demand_term_counts_never_a_reserved_one() -> None:
    (item,) = DATA["c7i.large"]["PriceList"]
    assert "Reserved" in json.loads(item)["terms"]  # the cheaper reserved rate is there, and ignored
    assert on_demand_usd([item], unit="Hrs", usage_contains="BoxUsage") == pytest.approx(C7I_LARGE)


def test_a_zero_price_is_no_price() -> None:
    doc = json.loads(DATA["c7i.large"]["PriceList"][0])
    for term in doc["terms"]["OnDemand"].values():
        for dimension in term["priceDimensions"].values():
            dimension["pricePerUnit"]["USD"] = "0.0000000000"
    assert on_demand_usd([json.dumps(doc)], unit="Hrs") is None


# -- the price book: Stubber-served Price List, cache for a day --------------------------------------------------


def test_on_demand_price_is_asked_once_and_cached_for_a_day(tmp_path: Path) -> None:
    now = [1_000_000.0]
    client = pricing_client()
    with Stubber(client) as stubber:
        expect_products(stubber, "c7i.large", aws_prices.instance_filters(REGION, "c7i.large"))
        book = PriceBook(lambda: client, lambda r: None, cache_dir=tmp_path, clock=lambda: now[0])
        assert book.on_demand(REGION, "c7i.large") == pytest.approx(C7I_LARGE)
        stubber.assert_no_pending_responses()
        # Another process, same cache: no call (the Stubber has no answer left and would fail one).
        again = PriceBook(lambda: client, lambda r: None, cache_dir=tmp_path, clock=lambda: now[0] + 3600)
        assert again.on_demand(REGION, "c7i.large") == pytest.approx(C7I_LARGE)
        cached = json.loads((tmp_path / f"{REGION}.json").read_text())
        assert cached["on-demand"]["c7i.large"]["value"] == pytest.approx(C7I_LARGE)
        # A day later the price is asked again.
        expect_products(stubber, "c7i.large", aws_prices.instance_filters(REGION, "c7i.large"))
        later = PriceBook(lambda: client, lambda r: None, cache_dir=tmp_path, clock=lambda: now[0] + 86401)
        assert later.on_demand(REGION, "c7i.large") == pytest.approx(C7I_LARGE)
        stubber.assert_no_pending_responses()


def test_the_same_answer_through_botocores_own_http_parser(tmp_path: Path) -> None:
    """Without the Stubber: the request is built and signed for real, and the recorded answer comes back as the
    HTTP body the Price List API sends (JSON 1.1), parsed by botocore."""
    from botocore.awsrequest import AWSResponse, HTTPHeaders

    client = pricing_client()
    sent: list[dict[str, Any]] = []

    def answer(request: Any, **kwargs: Any) -> AWSResponse:
        sent.append(json.loads(request.body))
        body = json.dumps(DATA["c7i.large"]).encode()

        class Raw:
            def stream(self, **kw: Any) -> Iterator[bytes]:
                yield body

        headers = HTTPHeaders()
        headers["Content-Type"] = "application/x-amz-json-1.1"
        return AWSResponse(request.url, 200, headers, Raw())

    client.meta.events.register("before-send.pricing.GetProducts", answer)
    book = PriceBook(lambda: client, lambda r: None, cache_dir=tmp_path)
    assert book.on_demand(REGION, "c7i.large") == pytest.approx(C7I_LARGE)
    (request,) = sent
    assert request["ServiceCode"] == "AmazonEC2" and request["FormatVersion"] == "aws_v1"
    assert {f["Field"]: f["Value"] for f in request["Filters"]}["instanceType"] == "c7i.large"


def test_the_filters_are_the_documented_ones() -> None:
    fields = {f["Field"]: f["Value"] for f in aws_prices.instance_filters("eu-west-1", "m7i.large")}
    assert fields == {
        "instanceType": "m7i.large",
        "regionCode": "eu-west-1",
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
    }
    assert all(f["Type"] == "TERM_MATCH" for f in aws_prices.instance_filters("eu-west-1", "m7i.large"))


def test_a_price_that_cannot_be_had_is_unknown_and_not_cached(tmp_path: Path) -> None:
    client = pricing_client()
    with Stubber(client) as stubber:
        stubber.add_client_error(
            "get_products", "AccessDeniedException", "not authorized to perform pricing:GetProducts"
        )
        stubber.add_response("get_products", {"FormatVersion": "aws_v1", "PriceList": []})
        book = PriceBook(lambda: client, lambda r: None, cache_dir=tmp_path)
        assert book.on_demand(REGION, "c7i.large") is None
        assert book.volume_gb_month(REGION, "gp3") is None
        assert book.on_demand(REGION, "c7i.large") is None  # not asked twice in one process
        stubber.assert_no_pending_responses()
    assert not (tmp_path / f"{REGION}.json").exists()
    assert PriceBook(lambda: None, lambda r: None, cache_dir=tmp_path).on_demand(REGION, "c7i.large") is None


def seed_prices(cache_dir: Path, *answers: tuple[str, list[dict[str, str]], str]) -> None:
    """Fill the price cache the way rawvm does, from Stubber-served answers."""
    client = pricing_client()
    book = PriceBook(lambda: client, lambda r: None, cache_dir=cache_dir)
    with Stubber(client) as stubber:
        for answer, filters, service in answers:
            expect_products(stubber, answer, filters, service)
        assert book.on_demand(REGION, "c7i.large") == pytest.approx(C7I_LARGE)
        if len(answers) > 1:
            assert book.volume_gb_month(REGION, "gp3") == pytest.approx(GP3)


C7I = ("c7i.large", aws_prices.instance_filters(REGION, "c7i.large"), "AmazonEC2")
GP3_ANSWER = ("gp3", aws_prices.volume_filters(REGION, "gp3"), "AmazonEC2")


# -- the estimate and the cap on moto --------------------------------------------------------------------------


def bare_provider(moto: MotoServer, tmp: Path, xdg_cache: Path) -> AwsProvider:
    """Enough to estimate (no images seeded, no bucket: nothing is launched)."""
    return AwsProvider(
        REGION,
        "b",
        session=session(),
        endpoint_url=moto.url,
        cache_dir=types_dir(xdg_cache),
        config_path=tmp / "aws.toml",
        price_cache_dir=tmp / "prices",
    )


def priced_provider(moto: MotoServer, tmp: Path, xdg_cache: Path, *, launches: bool = False) -> AwsProvider:
    seed_prices(tmp / "prices", C7I)
    if not launches:
        return bare_provider(moto, tmp, xdg_cache)
    provider = make_provider(moto, tmp)
    provider.cache_dir = types_dir(xdg_cache)
    provider.prices.cache_dir = tmp / "prices"
    return provider


@pytest.mark.slow
def test_estimate_matches_the_price_list_by_hand(moto: MotoServer, tmp_path: Path, xdg_cache: Path) -> None:
    provider = priced_provider(moto, tmp_path, xdg_cache)
    on_demand = provider.estimate(make_spec(tmp_path, "est", 4, vm_type="c7i.large"))
    assert on_demand.machine_hour == pytest.approx(C7I_LARGE)
    assert on_demand.fleet_hour == pytest.approx(4 * 0.08925)  # $0.357/h
    # 2 h lifetime + the 10 min backstop: 0.357 x 7800/3600 = $0.7735
    assert on_demand.worst_case(7200, BACKSTOP_GRACE) == pytest.approx(0.357 * 7800 / 3600)
    assert on_demand.basis == "c7i.large on-demand"
    spot = provider.estimate(make_spec(tmp_path, "est", 4, vm_type="c7i.large", spot_policy="spot"))
    assert spot.machine_hour == pytest.approx(MOTO_SPOT)  # moto's spot history answer, dearest zone
    fallback = provider.estimate(make_spec(tmp_path, "est", 4, vm_type="c7i.large", spot_policy="spot_with_fallback"))
    assert fallback.machine_hour == pytest.approx(C7I_LARGE)  # every machine may end up on demand
    line = cost_guard.plan(on_demand, lifetime_s=7200, grace_s=BACKSTOP_GRACE, max_cost=None).line
    assert line == (
        "price: 4 x c7i.large on-demand = $0.3570/h; worst case $0.7735 until --max-lifetime 2h "
        "(+10m backstop); no --max-cost set"
    )


def guard_2h_at_50_cents(provider: AwsProvider, spec: MachineSpec, action: str, said: list[str]) -> float:
    """The cost guard for a 2-hour launch of ``spec`` with --max-cost $0.50; what it says goes to ``said``."""
    return cost_guard.guard(
        lambda: provider.estimate(spec),
        lifetime_s=7200,
        grace_s=BACKSTOP_GRACE,
        max_cost=0.5,
        action=action,
        say=said.append,
    )


@pytest.mark.slow
def test_max_cost_refuses_with_one_line(moto: MotoServer, tmp_path: Path, xdg_cache: Path) -> None:
    provider = priced_provider(moto, tmp_path, xdg_cache)
    spec = make_spec(tmp_path, "capped", 4, vm_type="c7i.large")
    said: list[str] = []
    with pytest.raises(RawvmError) as info:
        guard_2h_at_50_cents(provider, spec, "refuse", said)
    message = str(info.value)
    assert "\n" not in message and said == []
    assert message.startswith("price: 4 x c7i.large on-demand = $0.3570/h; worst case $0.7735")
    assert "exceeds --max-cost $0.5000: refused" in message
    assert provider.list("capped") == []  # nothing launched


@pytest.mark.slow
def test_max_cost_shorten_lowers_each_lifetime_to_fit_and_the_machines_carry_it(
    moto: MotoServer, tmp_path: Path, xdg_cache: Path
) -> None:
    moto.reset()
    provider = priced_provider(moto, tmp_path, xdg_cache, launches=True)
    spec = make_spec(tmp_path, "short", 4, vm_type="c7i.large")
    said: list[str] = []
    lifetime = guard_2h_at_50_cents(provider, spec, "shorten", said)
    # By hand: $0.50 / $0.357 per hour = 5042.0 s, less the 600 s backstop grace.
    assert lifetime == math.floor(0.5 / (4 * 0.08925) * 3600 - 600) == 4442
    (line,) = said
    assert "exceeds --max-cost $0.5000: each machine's lifetime shortened to 1h14m2s (worst case $0.5000)" in line
    import dataclasses

    agent = dataclasses.replace(spec.agent, idle=dataclasses.replace(spec.agent.idle, max_lifetime=lifetime))
    machines = provider.launch(dataclasses.replace(spec, agent=agent))
    assert [m.price_per_hour for m in machines] == [pytest.approx(C7I_LARGE)] * 4
    reservations = provider.client("ec2", REGION).describe_instances(InstanceIds=[m.id for m in machines])
    for instance in (i for r in reservations["Reservations"] for i in r["Instances"]):
        tags = dict(iter_tags(instance["Tags"]))
        created = aws_sweep_time(tags["rawvm:created"])
        assert aws_sweep_time(tags["rawvm:expires"]) - created == 4442 + BACKSTOP_GRACE


def aws_sweep_time(text: str) -> float:
    from rawvm.providers.aws.sweep import parse_time

    stamp = parse_time(text)
    assert stamp is not None
    return stamp


@pytest.mark.slow
def test_unknown_price_with_a_cap_refuses_with_one_line(moto: MotoServer, tmp_path: Path, xdg_cache: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)  # a test endpoint and no pricing client: no price to be had
    provider.cache_dir = types_dir(xdg_cache)
    provider.prices.cache_dir = tmp_path / "empty-prices"
    spec = make_spec(tmp_path, "blind", 2, vm_type="c7i.large")
    price = provider.estimate(spec)
    assert price.machine_hour is None
    assert price.why_unknown == "no on-demand price for c7i.large in us-east-1 from the AWS Price List"
    with pytest.raises(RawvmError) as info:
        cost_guard.plan(price, lifetime_s=3600, grace_s=BACKSTOP_GRACE, max_cost=50)
    assert str(info.value).startswith("price unknown (no on-demand price for c7i.large in us-east-1")
    assert "cannot keep --max-cost $50.00" in str(info.value) and "\n" not in str(info.value)
    line = cost_guard.plan(price, lifetime_s=3600, grace_s=BACKSTOP_GRACE, max_cost=None).line
    assert "unknown" in line and "$" not in line  # never a made-up number
    (machine,) = provider.launch(make_spec(tmp_path, "blind", 1, vm_type="c7i.large"))
    assert machine.price_per_hour == 0.0  # unknown, shown as such by 'rawvm ls'


# -- the front door: flags, project default, one line on the command line -------------------------------------


@pytest.fixture
def aws_env(moto: MotoServer, tmp_path: Path, xdg_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI in this process against moto: boto3 reads AWS_ENDPOINT_URL; every rawvm path lives in tmp."""
    moto.reset()
    for key, value in {
        "AWS_ENDPOINT_URL": moto.url,
        "AWS_ENDPOINT_URL_PRICING": "http://127.0.0.1:9",  # nothing serves prices: a miss is an unknown
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "RAWVM_STATE_DIR": str(tmp_path / "state"),
        "RAWVM_CACHE_DIR": str(tmp_path / "cache"),
        "XDG_CACHE_HOME": str(xdg_cache),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    return tmp_path


def one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return code, err[0]


RUN = ["run", "--provider", "aws", "--region", REGION, "--vm-type", "c7i.large", "-n", "4", "--max-lifetime", "2h"]


@pytest.mark.slow
def test_cli_max_cost_below_the_worst_case_refuses_before_anything_is_locked(
    aws_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_prices(aws_env / "cache" / "prices", C7I)
    code, line = one_line(capsys, [*RUN, "--max-cost", "0.50", "--", "true"])
    assert code == 1
    assert line.startswith("rawvm: price: 4 x c7i.large on-demand = $0.3570/h; worst case $0.7735")
    assert line.endswith("or --max-cost-action shorten")
    assert not list((aws_env / "tmp").iterdir())  # nothing locked or staged
    assert not list((aws_env / "state" / "clusters").glob("*.json"))  # no cluster recorded


@pytest.mark.slow
def test_cli_project_default_cap_from_pyproject_and_unknown_price(
    aws_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (aws_env / "project" / "pyproject.toml").write_text('[project]\nname = "p"\n\n[tool.rawvm]\nmax-cost = 0.5\n')
    seed_prices(aws_env / "cache" / "prices", C7I)
    code, line = one_line(capsys, [*RUN, "--", "true"])
    assert code == 1 and "exceeds --max-cost $0.5000: refused" in line
    # No price can be read (nothing answers for the Price List) and a cap is set: refused, one line.
    (aws_env / "cache" / "prices" / f"{REGION}.json").unlink()
    code, line = one_line(capsys, [*RUN, "--", "true"])
    assert code == 1
    assert line.startswith("rawvm: price unknown (no on-demand price for c7i.large in us-east-1")
    assert "cannot keep --max-cost $0.5000" in line


def test_bad_max_cost_values_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--max-cost 'lots'"):
        cost_guard.parse_max_cost("lots")
    with pytest.raises(UsageError, match="positive"):
        cost_guard.parse_max_cost("-3")
    assert cost_guard.parse_max_cost("none") is None
    assert cost_guard.parse_max_cost("$12.5") == 12.5
    (tmp_path / "pyproject.toml").write_text('[tool.rawvm]\nmax-cost = "fifty"\n')
    with pytest.raises(UsageError, match=r"\[tool.rawvm\] max-cost must be a positive number"):
        cost_guard.resolve("default", "", tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.rawvm]\nmax-cost = 50\nmax-cost-action = "shorten"\n')
    (tmp_path / "sub").mkdir()
    assert cost_guard.resolve("default", "", tmp_path / "sub") == (50.0, "shorten")
    assert cost_guard.resolve("10", "refuse", tmp_path) == (10.0, "refuse")
    assert cost_guard.resolve("none", "", tmp_path) == (None, "shorten")


def test_this_repository_sets_a_default_cap(repo_root: Path) -> None:
    assert cost_guard.project_defaults(repo_root)["max_cost"] == 50.0


# -- the running total ------------------------------------------------------------------------------------------


def test_cost_so_far_is_capped_at_each_machines_lifetime() -> None:
    machines = [
        Machine(id=f"i-{i}", provider="aws", cluster="c", agent_url="", price_per_hour=0.5, launched_at=0.0)
        for i in range(2)
    ]
    record = clusters.ClusterRecord(name="c", provider="aws", token="t", machines=machines, max_lifetime_s=3000)
    assert costs.cost_of(record, until=1800) == pytest.approx(2 * 0.5 * 0.5)
    assert costs.cost_of(record, until=99999) == pytest.approx(2 * 0.5 * 3600 / 3600)  # 3000 s + 600 s grace
    assert "cost so far: $0.5000 at $1.0000/h" in costs.cost_line(record, costs.cost_of(record, 1800))
    record.machines[1].price_per_hour = 0.0
    assert costs.cost_line(record, 0.25).endswith("+ machines of unknown price")


@pytest.mark.slow
def test_ls_shows_the_price_per_machine_and_the_running_total(
    moto: MotoServer, aws_env: Path, xdg_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provider = priced_provider(moto, aws_env, xdg_cache, launches=True)
    machines = provider.launch(make_spec(aws_env, "priced", 2, vm_type="c7i.large"))
    import time

    half_hour_ago = time.time() - 1800
    for m in machines:
        m.launched_at = half_hour_ago
    record = clusters.ClusterRecord(
        name="priced",
        provider="aws",
        token="t",
        machines=machines,
        max_lifetime_s=7200,
        provider_options={"region": REGION},
        created=half_hour_ago,
    )
    clusters.save(record)
    assert main(["ls", "--json"]) == 0
    (view,) = json.loads(capsys.readouterr().out)
    assert view["price_per_hour"] == pytest.approx(2 * C7I_LARGE)
    assert view["cost_so_far"] == pytest.approx(2 * C7I_LARGE * 0.5, rel=2e-2)
    assert [m["price_per_hour"] for m in view["machines"]] == [pytest.approx(C7I_LARGE)] * 2  # numbers, not text
    assert main(["ls"]) == 0
    table = capsys.readouterr().out
    assert "cost so far" in table and "$0.089" in table


def test_the_progress_lines_carry_the_running_total() -> None:
    import io

    from rawvm.progress import PlainProgress

    out = io.StringIO()
    view = PlainProgress(out)
    view.update("m0", "booting")
    view.cost("cost so far: $0.0012 at $0.3570/h")
    view.update("m0", "booting")  # no phase change, no line
    view.update("m0", "ready")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "$" not in lines[0]
    assert lines[1].startswith("rawvm: m0 ready (") and lines[1].endswith("; cost so far: $0.0012 at $0.3570/h)")
