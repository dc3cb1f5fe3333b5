"""Lightning's Trainer, with count-or-fraction arguments parsed integer-first.

Lightning annotates ``limit_val_batches`` and friends as ``Union[float, int]``; jsonargparse tries
float first, so ``limit_val_batches: 1`` (one batch) became ``1.0`` (100% of batches). Declaring
them ``int | float`` keeps integers integers; ``0.5`` and ``1.0`` stay fractions.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class Trainer(pl.Trainer):
    def __init__(self, *, limit_train_batches: int | float | None = None,
                 limit_val_batches: int | float | None = None,
                 limit_test_batches: int | float | None = None,
                 limit_predict_batches: int | float | None = None,
                 val_check_interval: int | float | None = None,
                 overfit_batches: int | float = 0.0, **kwargs: Any) -> None:
        super().__init__(limit_train_batches=limit_train_batches,
                         limit_val_batches=limit_val_batches,
                         limit_test_batches=limit_test_batches,
                         limit_predict_batches=limit_predict_batches,
                         val_check_interval=val_check_interval,
                         overfit_batches=overfit_batches, **kwargs)

