"""Datasets: where they live (`fetch`), what they hold (`listing`, `sources`), decoding
(`decode`, `mnist`), the decoded-image store shared by trials (`decoded_store`) and the seeds'
transforms on decoded images (`transforms`)."""
