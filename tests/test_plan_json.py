"""DevicePlan.from_json is a parser of user files: every hostile input is a DeviceMapError naming
the field, never a TypeError deep inside a stage; a valid plan round-trips exactly."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigload import init_empty_weights, plan_devices
from bigload.errors import BigloadError, DeviceMapError
from bigload.plan import DevicePlan
from conftest import NestedBlocksModel

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def plan_text() -> str:
    with init_empty_weights():
        model = NestedBlocksModel()
    return plan_devices(model, max_memory={"cpu": 3000, "disk": "1GB"}).to_json()


def test_round_trip(plan_text):
    plan = DevicePlan.from_json(plan_text)
    assert plan.to_json() == plan_text
    assert DevicePlan.from_json(plan_text.encode()) == plan


@pytest.mark.parametrize(("change", "match"), [
    (lambda d: d.pop("units"), "'units' is missing"),
    (lambda d: d.update(units={}), "'units' is a dict"),
    (lambda d: d["units"][0].update(size_bytes="12"), r"units\[0\].size_bytes"),
    (lambda d: d["units"][0].update(size_bytes=-1), r"units\[0\].size_bytes"),
    (lambda d: d["units"][0].update(size_bytes=True), r"units\[0\].size_bytes"),
    (lambda d: d["units"][1].update(placement="cuda:²"), r"units\[1\]"),
    (lambda d: d["units"][1].update(placement="moon"), r"units\[1\]"),
    (lambda d: d["units"][0].pop("reason"), r"units\[0\] has fields"),
    (lambda d: d.update(units=[[1, 2]]), r"units\[0\] is a list"),
    (lambda d: d.update(budgets=[1]), "'budgets' is a list"),
    (lambda d: d.update(budgets={"cpu": "lots"}), "budgets"),
    (lambda d: d.update(main_device="disk"), "main_device cannot be 'disk'"),
    (lambda d: d.update(strategy="fastest"), "strategy"),
    (lambda d: d.update(prefetch=-2), "prefetch"),
    (lambda d: d.update(notes="x"), "'notes' is a str"),
    (lambda d: d.update(tie_groups=[["a", 1]]), r"tie_groups\[0\]\[1\]"),
    (lambda d: d.update(format="bigload.DevicePlan/1"), "format"),
    (lambda d: d.update(extra=1), "unknown field"),
])
def test_each_bad_field_is_named(plan_text, change, match):
    data = json.loads(plan_text)
    change(data)
    with pytest.raises(DeviceMapError, match=match):
        DevicePlan.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "[]", "null", "{", "1e400", "[" * 100_000 + "]" * 100_000,
                                  '{"format": "bigload.DevicePlan/2"}'])
def test_not_a_plan_at_all(text):
    with pytest.raises(DeviceMapError, match="not a DevicePlan JSON"):
        DevicePlan.from_json(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.data())
def test_fuzz_mutated_plans_load_or_raise_typed(plan_text, data):
    doc = json.loads(plan_text)
    field = data.draw(st.sampled_from(sorted(doc)))
    if field == "units" and data.draw(st.booleans()):
        unit = data.draw(st.integers(0, len(doc["units"]) - 1))
        key = data.draw(st.sampled_from(sorted(doc["units"][unit])))
        doc["units"][unit][key] = data.draw(json_values)
    else:
        doc[field] = data.draw(json_values)
    try:
        plan = DevicePlan.from_json(json.dumps(doc))
    except BigloadError:
        return
    assert DevicePlan.from_json(plan.to_json()) == plan  # whatever loads is a real plan
    assert all(isinstance(u.size_bytes, int) and u.size_bytes >= 0 for u in plan.units)
    str(plan)


def test_no_split_module_classes_of_the_wrong_type_is_a_typed_error():
    with init_empty_weights():
        model = NestedBlocksModel()
    with pytest.raises(DeviceMapError, match="no_split_module_classes: 3"):
        plan_devices(model, no_split_module_classes=3, max_memory={"cpu": 10**6})
    with pytest.raises(DeviceMapError, match="no_split_module_classes"):
        plan_devices(model, no_split_module_classes=[torch.nn.Linear, 2], max_memory={"cpu": 1})
