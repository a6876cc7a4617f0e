-- Personal-data erasure (ops/forget_user.py, `jiralake forget-user`). Nothing here is issue data.
--
-- The secret behind the pseudonym that replaces a forgotten Server/Data Center username:
-- `former-user-` + the first 16 hex digits of HMAC-SHA256(key, the lower-cased username). The first
-- forget-user run that needs it writes it (256 random bits from Python's `secrets`); nothing changes it.
-- So one person always gets the same pseudonym, also from a second run after a late event brought
-- the username back, and without the key nobody can confirm a guessed username from its pseudonym
-- (an unkeyed hash of a username is reversed by trying names). Keep it away from analysts: grant it
-- to no BI role; the exports never read it. Losing it only means that someone forgotten again later
-- gets a second pseudonym.
CREATE TABLE jiralake_pseudonym_key (
    id          smallint PRIMARY KEY CHECK (id = 1),
    key         text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
