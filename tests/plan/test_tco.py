"""The TCO arithmetic against a worked example done by hand."""

from __future__ import annotations

import pytest

from kvasir.plan.tco import (
    TCOInputs,
    cost_per_user_month,
    on_prem_hourly,
    tco,
    users_per_deployment,
)

# One 8-GPU server: GPUs at $30,000, server $100,000 all in (80k + 15k networking +
# 5k storage), 4 years; 700 W GPUs drawing 30 % idle .. 80 % flat out, 2 kW of server
# overhead; PUE 1.25, $0.12/kWh; colocation $200/kW-month; one engineer ($240k/year) per
# 40 servers; 50 % utilisation; cloud $10/GPU-hour on demand, $6 reserved.
EXAMPLE = TCOInputs(
    num_accelerators=8,
    accelerator_price_usd=30_000,
    accelerator_tdp_w=700,
    server_cost_usd=80_000,
    networking_cost_per_server_usd=15_000,
    storage_cost_per_server_usd=5_000,
    depreciation_years=4,
    idle_power_fraction=0.3,
    load_power_fraction=0.8,
    server_overhead_w=2_000,
    pue=1.25,
    usd_per_kwh=0.12,
    colocation_usd_per_kw_month=200,
    ops_staff_usd_per_year=240_000,
    servers_per_fte=40,
    cloud_on_demand_usd_per_hour=10.0,
    cloud_reserved_usd_per_hour=6.0,
    utilization=0.5,
)


def test_worked_example() -> None:
    # CapEx 8 x 30,000 + 100,000 = 340,000 over 4 x 8,760 h = 9.7032 $/h
    # draw: 8 x 700 x (0.3 + 0.5 x 0.5) = 3,080 W + 2,000 W = 5.08 kW; x 1.25 x 0.12 = 0.762 $/h
    # colocation: (5,600 + 2,000) W = 7.6 kW x 200 / 730 = 2.08219 $/h
    # staff: 1/40 x 240,000 / 8,760 = 0.684932 $/h
    h = on_prem_hourly(EXAMPLE)
    assert h.capex == pytest.approx(340_000 / 35_040)
    assert h.energy == pytest.approx(0.762)
    assert h.colocation == pytest.approx(7.6 * 200 / 730)
    assert h.staff == pytest.approx(240_000 / 40 / 8760)
    total = 340_000 / 35_040 + 0.762 + 7.6 * 200 / 730 + 240_000 / 40 / 8760  # 13.2322 $/h
    assert h.total == pytest.approx(total)
    # 10,000 tok/s at 50 %: 18 M tokens an hour -> 13.2322 / 18 = 0.73512 $/M
    r = tco(EXAMPLE, 10_000)
    assert r.on_prem_usd_per_mtok == pytest.approx(total / 18)
    # on demand, elastic: $80/h for 36 M tokens = 2.2222 $/M; reserved: $48/h for 18 M
    assert r.on_demand_usd_per_mtok == pytest.approx(80 / 36)
    assert r.reserved_usd_per_mtok == pytest.approx(48 / 18)
    # break-even with on demand: on-prem hourly(u) = 80 u, the draw depending on u:
    # 9.7032 + 2.0822 + 0.6849 + (3.68 + 2.8 u) kW x 1.25 x 0.12 = 80 u -> u = 0.16364
    fixed = 340_000 / 35_040 + 7.6 * 200 / 730 + 240_000 / 40 / 8760
    u = (fixed + 3.68 * 0.15) / (80 - 2.8 * 0.15)
    assert u == pytest.approx(0.16364, abs=1e-5)
    assert r.break_even_utilization_vs_on_demand == pytest.approx(u, rel=1e-6)
    # months until 340,000 up front + OpEx beats renting the same hours:
    # reserved: 48 - (0.762 + 2.0822 + 0.6849) = 44.471 $/h saved x 730 h = 32,464 $/month
    opex = 0.762 + 7.6 * 200 / 730 + 240_000 / 40 / 8760
    assert r.break_even_months_vs_reserved == pytest.approx(340_000 / ((48 - opex) * 730))
    assert r.break_even_months_vs_on_demand == pytest.approx(340_000 / ((80 * 0.5 - opex) * 730))


def test_per_user_and_utilisation_sensitivity() -> None:
    # 0.73512 $/M x 20,000 tokens a day x 30 days = 0.441 $ per user-month
    r = tco(EXAMPLE, 10_000)
    assert cost_per_user_month(r.on_prem_usd_per_mtok, 20_000) == pytest.approx(
        r.on_prem_usd_per_mtok * 0.6
    )
    assert users_per_deployment(10_000, 0.5, 20_000) == pytest.approx(21_600)
    costs = [
        tco(TCOInputs(**{**EXAMPLE.__dict__, "utilization": u}), 10_000).on_prem_usd_per_mtok
        for u in (0.25, 0.5, 1.0)
    ]
    assert costs[0] > costs[1] > costs[2]
    # fixed costs dominate: halving utilisation nearly doubles the cost per token
    assert 1.8 < costs[0] / costs[1] < 2.0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="--utilization"):
        TCOInputs(num_accelerators=1, accelerator_price_usd=1, accelerator_tdp_w=1, utilization=0)
    with pytest.raises(ValueError, match="tokens_per_s"):
        tco(EXAMPLE, 0)
