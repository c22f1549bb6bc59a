"""Total cost of ownership: what a deployment costs per hour on premises, in the cloud
on demand and reserved, and so per million tokens, per user and where the options
break even.

On premises and reserved capacity are paid for every hour whether used or not, so their
cost per token divides by the utilisation; on-demand capacity is assumed elastic (held
only while busy), so its cost per token does not. Break-even utilisation: where
on-premises (or reserved) cost per token equals on-demand's. Break-even time: the
months after which buying has cost less than renting the same hours.

The defaults are assumptions named with their source; every one is a flag of
``kvasir plan tco``. The arithmetic is checked against a worked example in the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

HOURS_PER_YEAR = 8760.0
HOURS_PER_MONTH = HOURS_PER_YEAR / 12

# Cloud prices per accelerator-hour: (on demand, 1-year reserved, source). Instance
# prices divided by their accelerators; reserved = on demand less the discount of
# ``RESERVED_DISCOUNT`` where the provider publishes no per-GPU reserved price. Recorded
# from the providers' pricing pages as of 2024, offline: check them before deciding.
RESERVED_DISCOUNT = 0.40  # 1-year commitments: typically 30-45 % off (AWS Savings Plans page)
CLOUD_PRICES: dict[str, tuple[float, float | None, str]] = {
    "h100-sxm": (98.32 / 8, None, "AWS EC2 p5.48xlarge (8 x H100) on demand, us-east-1, 2024"),
    "a100-80gb": (40.97 / 8, None, "AWS EC2 p4de.24xlarge (8 x A100 80GB) on demand, 2024"),
    "l40s": (30.13 / 8, None, "AWS EC2 g6e.48xlarge (8 x L40S) on demand, us-east-1, 2024"),
    "l4": (13.35 / 8, None, "AWS EC2 g6.48xlarge (8 x L4) on demand, us-east-1, 2024"),
    "tpu-v5e": (1.20, 0.84, "Google Cloud TPU pricing, v5e per chip-hour (1-year CUD), 2024"),
    "tpu-v5p": (4.20, 2.94, "Google Cloud TPU pricing, v5p per chip-hour (1-year CUD), 2024"),
}


@dataclass(frozen=True)
class TCOInputs:
    """One deployment of ``num_accelerators`` devices (``accelerators_per_server`` to a
    server). Money in US$, power in W."""

    num_accelerators: int
    accelerator_price_usd: float
    accelerator_tdp_w: float
    accelerators_per_server: int = 8
    # An 8-GPU server without its GPUs (CPUs, memory, chassis, NICs): assumption, of
    # the order of OEM HGX quotes (2024).
    server_cost_usd: float = 80_000.0
    networking_cost_per_server_usd: float = 25_000.0  # switch ports, optics, cables
    storage_cost_per_server_usd: float = 5_000.0
    depreciation_years: float = 4.0
    # Average draw as a fraction of TDP: idle, and flat out (utilisation scales between).
    idle_power_fraction: float = 0.3
    load_power_fraction: float = 0.8
    server_overhead_w: float = 2_000.0  # CPUs, fans, NICs of one server
    pue: float = 1.3  # modern colocation (Uptime Institute surveys: 1.3-1.6)
    usd_per_kwh: float = 0.10  # US industrial electricity, EIA 2024: ~$0.08-0.10
    colocation_usd_per_kw_month: float = 150.0  # CBRE data-centre trends 2023-24
    ops_staff_usd_per_year: float = 200_000.0  # one fully loaded operations engineer
    servers_per_fte: float = 50.0
    cloud_on_demand_usd_per_hour: float | None = None  # per accelerator
    cloud_reserved_usd_per_hour: float | None = None
    utilization: float = 0.6  # fraction of hours serving at the modelled throughput

    def __post_init__(self) -> None:
        if self.num_accelerators < 1:
            raise ValueError("num_accelerators must be >= 1")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"--utilization must be in (0, 1], got {self.utilization}")
        if self.depreciation_years <= 0:
            raise ValueError("--depreciation-years must be > 0")

    @property
    def num_servers(self) -> float:
        return self.num_accelerators / self.accelerators_per_server


@dataclass(frozen=True)
class HourlyCost:
    capex: float
    energy: float
    colocation: float
    staff: float

    @property
    def total(self) -> float:
        return self.capex + self.energy + self.colocation + self.staff

    @property
    def opex(self) -> float:
        return self.energy + self.colocation + self.staff


def capex_usd(t: TCOInputs) -> float:
    per_server = (
        t.server_cost_usd + t.networking_cost_per_server_usd + t.storage_cost_per_server_usd
    )
    return t.num_accelerators * t.accelerator_price_usd + t.num_servers * per_server


def on_prem_hourly(t: TCOInputs) -> HourlyCost:
    """Straight-line depreciation of the CapEx; energy at the average draw for the
    utilisation, times PUE; colocation on the provisioned (TDP) power; staff."""
    capex = capex_usd(t) / (t.depreciation_years * HOURS_PER_YEAR)
    frac = t.idle_power_fraction + (t.load_power_fraction - t.idle_power_fraction) * t.utilization
    draw_kw = (
        t.num_accelerators * t.accelerator_tdp_w * frac + t.num_servers * t.server_overhead_w
    ) / 1e3
    energy = draw_kw * t.pue * t.usd_per_kwh
    provisioned_kw = (
        t.num_accelerators * t.accelerator_tdp_w + t.num_servers * t.server_overhead_w
    ) / 1e3
    colo = provisioned_kw * t.colocation_usd_per_kw_month / HOURS_PER_MONTH
    staff = t.num_servers / t.servers_per_fte * t.ops_staff_usd_per_year / HOURS_PER_YEAR
    return HourlyCost(capex, energy, colo, staff)


@dataclass(frozen=True)
class TCOResult:
    tokens_per_s: float  # at full load (the modelled throughput)
    on_prem_usd_per_hour: float
    on_prem_usd_per_mtok: float
    on_demand_usd_per_mtok: float | None
    reserved_usd_per_mtok: float | None
    capex_usd: float
    hourly: HourlyCost
    break_even_utilization_vs_on_demand: float | None
    break_even_months_vs_on_demand: float | None
    break_even_months_vs_reserved: float | None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hourly"] = asdict(self.hourly) | {"total": self.hourly.total}
        return d


def usd_per_mtok(usd_per_hour: float, tokens_per_s: float, utilization: float) -> float:
    return usd_per_hour / (tokens_per_s * 3600 * utilization) * 1e6


def tco(t: TCOInputs, tokens_per_s: float) -> TCOResult:
    """Cost per million tokens of a deployment serving ``tokens_per_s`` at full load."""
    if tokens_per_s <= 0:
        raise ValueError("tokens_per_s must be > 0")
    hourly = on_prem_hourly(t)
    onprem = usd_per_mtok(hourly.total, tokens_per_s, t.utilization)
    od_h = t.cloud_on_demand_usd_per_hour
    rs_h = t.cloud_reserved_usd_per_hour
    od = usd_per_mtok(od_h * t.num_accelerators, tokens_per_s, 1.0) if od_h else None
    rs = usd_per_mtok(rs_h * t.num_accelerators, tokens_per_s, t.utilization) if rs_h else None
    be_util = be_od = be_rs = None
    if od_h:
        # on-prem $/tok(u) = hourly(u) / (tps u); equal to on-demand's od_h N / tps:
        # energy depends on u, so solve hourly(u) = od_h N u by bisection.
        be_util = _solve_break_even_utilization(t, od_h * t.num_accelerators)
        be_od = _break_even_months(t, hourly, od_h * t.num_accelerators * t.utilization)
    if rs_h:
        be_rs = _break_even_months(t, hourly, rs_h * t.num_accelerators)
    return TCOResult(
        tokens_per_s=tokens_per_s,
        on_prem_usd_per_hour=hourly.total,
        on_prem_usd_per_mtok=onprem,
        on_demand_usd_per_mtok=od,
        reserved_usd_per_mtok=rs,
        capex_usd=capex_usd(t),
        hourly=hourly,
        break_even_utilization_vs_on_demand=be_util,
        break_even_months_vs_on_demand=be_od,
        break_even_months_vs_reserved=be_rs,
    )


def _solve_break_even_utilization(t: TCOInputs, od_per_hour: float) -> float | None:
    """Utilisation u at which on-premises cost per token equals on demand's (None if
    on premises is dearer even fully used)."""

    def gap(u: float) -> float:
        return on_prem_hourly(replace(t, utilization=u)).total - od_per_hour * u

    if gap(1.0) > 0:
        return None
    lo, hi = 1e-6, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if gap(mid) > 0:
            lo = mid
        else:
            hi = mid
    return hi


def _break_even_months(t: TCOInputs, hourly: HourlyCost, cloud_per_hour: float) -> float | None:
    """Months until CapEx paid up front plus on-premises OpEx equals the cloud bill
    for the same hours (None if the cloud's hourly cost is below the OpEx)."""
    saving = (cloud_per_hour - hourly.opex) * HOURS_PER_MONTH
    if saving <= 0:
        return None
    return capex_usd(t) / saving


def cost_per_user_month(usd_per_mtok_value: float, tokens_per_user_per_day: float) -> float:
    return usd_per_mtok_value * tokens_per_user_per_day * 30 / 1e6


def users_per_deployment(
    tokens_per_s: float, utilization: float, tokens_per_user_per_day: float
) -> float:
    return tokens_per_s * 86400 * utilization / tokens_per_user_per_day


def inputs_for(
    hardware_name: str, num_accelerators: int, price: float | None, tdp: float | None, **kw
) -> TCOInputs:
    """``TCOInputs`` with the catalogue's price and TDP and the cloud table's prices."""
    od, rs, _ = CLOUD_PRICES.get(hardware_name, (None, None, ""))
    if od is not None and rs is None:
        rs = od * (1 - RESERVED_DISCOUNT)
    if price is None and kw.get("accelerator_price_usd") is None:
        raise ValueError(
            f"--hardware {hardware_name} has no purchase price in the catalogue; give "
            "--accelerator-price"
        )
    base: dict[str, Any] = {
        "num_accelerators": num_accelerators,
        "accelerator_price_usd": price or 0.0,
        "accelerator_tdp_w": tdp or 0.0,
        "cloud_on_demand_usd_per_hour": od,
        "cloud_reserved_usd_per_hour": rs,
    }
    base.update({k: v for k, v in kw.items() if v is not None})
    return TCOInputs(**base)
