"""Code every jiralake service uses: settings, logging, AWS and Postgres access, the message contract.

Dependencies point one way: nothing here imports receiver, consumer, exporter, ops or backfill.
"""
