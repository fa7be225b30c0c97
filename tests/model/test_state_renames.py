"""The key renames the checkpoint upgrade chain applies to what older clipforge versions wrote."""

import math

import pytest
import torch

from clipforge.model import create_model, rename_logit_scale, rename_logit_scale_in_optimizer
from tests.model.test_clip_model import VOCAB, tiny_config


def old_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as the format-1 checkpoints hold it: the log t under the key ``logit_scale``."""
    return {("logit_scale" if key == "log_logit_scale" else key): value for key, value in model.state_dict().items()}


def test_an_old_state_loads_strictly_after_the_rename_with_its_value_unchanged() -> None:
    torch.manual_seed(0)
    source = create_model(tiny_config(), loss_kind="siglip", vocab_size=VOCAB)
    with torch.no_grad():
        source.log_logit_scale.fill_(math.log(42.0))
    old = old_state(source)
    target = create_model(tiny_config(), loss_kind="siglip", vocab_size=VOCAB)
    with pytest.raises(RuntimeError, match="logit_scale"):
        target.load_state_dict(old)  # what load_checkpoint meets without the upgrade
    renamed = rename_logit_scale(old)
    target.load_state_dict(renamed)  # strict
    # the old key held log t too: copied, not exponentiated
    assert renamed["log_logit_scale"] is old["logit_scale"]
    assert torch.equal(target.log_logit_scale, source.log_logit_scale)
    assert list(renamed) == [("log_logit_scale" if key == "logit_scale" else key) for key in old]  # order kept
    assert "logit_scale" in old and "log_logit_scale" not in old  # the argument is left as it was


def test_the_rename_is_idempotent_and_refuses_a_state_with_both_names() -> None:
    state = {"image_head.proj.weight": torch.ones(2, 2), "log_logit_scale": torch.tensor(1.0)}
    assert rename_logit_scale(state) == state and rename_logit_scale(state) is not state
    with pytest.raises(ValueError, match="both"):
        rename_logit_scale({**state, "logit_scale": torch.tensor(2.0)})


def test_an_optimizer_state_keyed_by_name_is_renamed_and_one_keyed_by_number_is_not() -> None:
    moments = {"step": torch.tensor(3.0), "exp_avg": torch.tensor(0.5)}
    by_name = {
        "state": {"text_head.proj.weight": {}, "logit_scale": moments},
        "param_groups": [{"lr": 1e-3, "params": ["text_head.proj.weight"]}, {"lr": 1e-3, "params": ["logit_scale"]}],
    }
    renamed = rename_logit_scale_in_optimizer(by_name)
    assert renamed["state"] == {"text_head.proj.weight": {}, "log_logit_scale": moments}
    assert [group["params"] for group in renamed["param_groups"]] == [["text_head.proj.weight"], ["log_logit_scale"]]
    assert renamed["param_groups"][1]["lr"] == 1e-3 and by_name["param_groups"][1]["params"] == ["logit_scale"]
    by_number = {"state": {0: moments}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}
    assert rename_logit_scale_in_optimizer(by_number) == by_number
    with pytest.raises(ValueError, match="both"):
        rename_logit_scale_in_optimizer({**by_name, "state": {"logit_scale": {}, "log_logit_scale": {}}})
