"""The demo's data: daily S&P 500 and NASDAQ prices (1999-2018) as a forecasting task.

The prices come from the `arch` package, which ships them (about 5,000 trading days of
daily open, high, low and close for each index). Nothing here falls back to made-up
data: if the prices cannot be loaded, `load_prices` raises `DemoDataError` saying
what to install.

The task: predict the next trading day's S&P 500 volatility from a window of the past
days of both indices.

*Volatility* of a day is the Parkinson range estimator, ``ln(high / low) / sqrt(4 ln 2)``,
an estimate of that day's standard deviation of log returns from its intraday range. It
is far less noisy than ``|return|`` (one close-to-close move) and needs only daily bars.
The target is its logarithm, whose distribution is close to normal, so mean squared error
is a sound loss. The features of each day are the close-to-close log returns and the log
range volatilities of both indices (four numbers).

No look-ahead:

* A sample's input window ends the day *before* its target day.
* The split is by date: samples whose target day is before `SPLIT_DATE` train, the rest
  validate. Validation windows may start before the split date; that is past data,
  known at prediction time.
* Features and target are standardised with means and standard deviations computed on
  training days only.

The naive baseline predicts tomorrow's log volatility as today's (the persistence
forecast); in standardised units that is the last day of the input window's own target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SPLIT_DATE = "2015-01-01"  # first day whose volatility is a validation target
FEATURES = ("sp500_return", "nasdaq_return", "sp500_log_vol", "nasdaq_log_vol")
_PARKINSON = math.sqrt(4.0 * math.log(2.0))
_INSTALL_HINT = "install it with `pip install 'ckptstore[demo]'` (or `pip install arch`)"


class DemoDataError(RuntimeError):
    """The demo's market data could not be loaded; the message says what to install."""


@dataclass(frozen=True)
class Prices:
    """Daily bars of both indices on their common trading days."""

    dates: np.ndarray  # datetime64[D], ascending
    sp500_close: np.ndarray  # float64; adjusted close
    sp500_high: np.ndarray
    sp500_low: np.ndarray
    nasdaq_close: np.ndarray
    nasdaq_high: np.ndarray
    nasdaq_low: np.ndarray


@dataclass(frozen=True)
class MarketTask:
    """Standardised daily features and targets, and which target days train or validate.

    ``features[t]`` and ``target[t]`` describe day ``t``. A sample predicts ``target[t]``
    from ``features[t - window : t]``.
    """

    dates: np.ndarray  # datetime64[D]
    features: torch.Tensor  # (days, len(FEATURES)) float32, standardised
    target: torch.Tensor  # (days,) float32, standardised log volatility of the S&P 500
    window: int
    train_days: torch.Tensor  # int64 target-day indices with date < SPLIT_DATE
    val_days: torch.Tensor  # int64 target-day indices on or after SPLIT_DATE
    target_mean: float  # of the log volatility on training days, to undo the scaling
    target_std: float

    def inputs(self, days: torch.Tensor) -> torch.Tensor:
        """The ``(len(days), window, features)`` input windows ending the day before each."""
        offsets = torch.arange(-self.window, 0)
        return self.features[days.unsqueeze(1) + offsets]

    def baseline(self, days: torch.Tensor) -> torch.Tensor:
        """The persistence forecast of each target day: the previous day's target."""
        return self.target[days - 1]


def load_prices() -> Prices:
    """Both indices' daily bars from the `arch` package; DemoDataError if unavailable."""
    try:
        from arch.data import nasdaq, sp500
    except ImportError as error:
        raise DemoDataError(
            f"the demo trains on the S&P 500 and NASDAQ prices shipped by the `arch` "
            f"package, which could not be imported ({error}); {_INSTALL_HINT}"
        ) from error
    try:
        spx, ndx = sp500.load(), nasdaq.load()
    except Exception as error:  # a broken install: missing file, pandas, parser
        raise DemoDataError(
            f"the `arch` package is installed but its market data could not be loaded "
            f"({type(error).__name__}: {error}); reinstall it: {_INSTALL_HINT}"
        ) from error

    common = spx.index.intersection(ndx.index)
    spx, ndx = spx.loc[common], ndx.loc[common]
    if len(common) < 1000:
        raise DemoDataError(
            f"expected about 5,000 common trading days from `arch`, got {len(common)}; "
            f"reinstall it: {_INSTALL_HINT}"
        )
    return Prices(
        dates=common.to_numpy().astype("datetime64[D]"),
        sp500_close=spx["Adj Close"].to_numpy(np.float64),
        sp500_high=spx["High"].to_numpy(np.float64),
        sp500_low=spx["Low"].to_numpy(np.float64),
        nasdaq_close=ndx["Adj Close"].to_numpy(np.float64),
        nasdaq_high=ndx["High"].to_numpy(np.float64),
        nasdaq_low=ndx["Low"].to_numpy(np.float64),
    )


def log_range_volatility(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Log of the Parkinson volatility of each day (a floor keeps a flat day finite)."""
    return np.log(np.maximum(np.log(high / low), 1e-6) / _PARKINSON)


def build_task(prices: Prices, window: int) -> MarketTask:
    """Features, target and the date split of `prices`, standardised on training days."""
    if window < 2:
        raise ValueError(f"window must be at least 2 days, not {window}")
    # Day 0 has no previous close, so every series starts on day 1.
    raw = np.stack(
        [
            np.diff(np.log(prices.sp500_close)),
            np.diff(np.log(prices.nasdaq_close)),
            log_range_volatility(prices.sp500_high, prices.sp500_low)[1:],
            log_range_volatility(prices.nasdaq_high, prices.nasdaq_low)[1:],
        ],
        axis=1,
    )
    dates = prices.dates[1:]
    target = raw[:, 2]

    split = int(np.searchsorted(dates, np.datetime64(SPLIT_DATE)))
    if not window < split < len(dates):
        raise DemoDataError(
            f"the split date {SPLIT_DATE} leaves no training or validation days in "
            f"{dates[0]}..{dates[-1]} with a {window}-day window"
        )
    mean, std = raw[:split].mean(axis=0), raw[:split].std(axis=0)
    t_mean, t_std = float(target[:split].mean()), float(target[:split].std())
    return MarketTask(
        dates=dates,
        features=torch.from_numpy(((raw - mean) / std).astype(np.float32)),
        target=torch.from_numpy(((target - t_mean) / t_std).astype(np.float32)),
        window=window,
        train_days=torch.arange(window, split),
        val_days=torch.arange(split, len(dates)),
        target_mean=t_mean,
        target_std=t_std,
    )
