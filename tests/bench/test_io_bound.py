"""bench.io_bound's arguments: a bad one is refused before anything starts."""

import pytest

from bench.io_bound import main


def test_an_open_loop_of_no_orders_is_refused_with_what_to_give_instead(capsys):
    with pytest.raises(SystemExit) as refused:
        main(["--rate-orders", "0"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "--rate-orders 0" in err
    assert "--rate 0 to skip the open loop" in err
