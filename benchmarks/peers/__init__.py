"""Peer libraries trained under gfalign's protocols, their runs written where the report reads
them (``results/peers/``); one module per peer and model (``biotorch_lenet``)."""
