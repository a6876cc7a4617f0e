-- The consumer's version guard as one function, so the upsert in consumer/queries.sql reads as what
-- it means. True when (new_version, new_tiebreak) sorts strictly after (old_version, old_tiebreak):
-- a missing new state never wins, a missing old state always loses, an equal state is not newer (so
-- a duplicate changes nothing). Tie-breaks compare byte-wise (COLLATE "C"), whatever the database's
-- collation; a missing tie-break sorts first. Never NULL. A single-expression SQL function: the
-- planner inlines it.
CREATE FUNCTION jiralake_is_newer(
    new_version anyelement, new_tiebreak text, old_version anyelement, old_tiebreak text
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT new_version IS NOT NULL AND (
        old_version IS NULL
        OR (new_version, coalesce(new_tiebreak, '') COLLATE "C")
            > (old_version, coalesce(old_tiebreak, '') COLLATE "C")
    )
$$;
