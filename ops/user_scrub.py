"""Scrubbing one person out of one row, pure (no database): what ``jiralake forget-user``
(ops/forget_user.py, whose docstring says what changes and why) does to each row it locked.

A JSON object is the person's user object by its id fields only (:meth:`Person.owns`); it keeps
``accountId``, ``accountType`` and ``active``, its ``displayName`` becomes "Former user", and on
Server/Data Center its ``name``/``key`` become the pseudonym. Changelog items whose ``from``/``to``
name the person get "Former user" as ``fromString``/``toString``, unless the id is numeric and the
item is not about a user (:func:`_names_a_user`: a status whose id equals a numeric username).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FORMER_USER = "Former user"  # Jira Cloud's own display name for a deleted account
PSEUDONYM_PREFIX = "former-user-"
PSEUDONYM_HEX_DIGITS = 16
# What a scrubbed user object keeps besides its displayName (and, on Data Center, its pseudonymous
# name and key): the Cloud id and two facts about the account that identify nobody.
KEPT_USER_FIELDS = ("accountId", "accountType", "active")
# A JSON object is a user object only with one of these (projects, statuses, groups have none).
USER_OBJECT_MARKERS = ("accountId", "displayName", "emailAddress")

# A changelog item's two sides: (id, display text, Cloud's account id of that side).
_CHANGE_SIDES = (("from", "fromString", "tmpFromAccountId"), ("to", "toString", "tmpToAccountId"))
# Jira's own fields whose changelog items name a user (by username or key on Server/Data Center),
# and Jira's own fields whose items carry numeric ids of other things (a numeric username or key
# matching one of those is never the person).
USER_SYSTEM_FIELDS = frozenset({"assignee", "reporter", "creator"})
NOT_USER_SYSTEM_FIELDS = frozenset(
    {
        "status", "resolution", "priority", "issuetype", "project", "workflow", "fix version",
        "fixversions", "version", "versions", "component", "components", "sprint", "parent",
        "epic link", "link", "worklogid", "timespent", "timeestimate", "timeoriginalestimate",
        "security", "rank", "attachment", "key",
    }
)  # fmt: skip


@dataclass
class Person:
    """Whom to forget: exactly one of ``account_id`` (Cloud) or ``username`` (Server/Data Center)."""

    account_id: str | None = None
    username: str | None = None
    # What a username, and every other id of the person, becomes (username mode only).
    pseudonym: str | None = None
    # Other ids of the person met in their user objects (lower-cased): see ops/forget_user.py, "Who".
    learned: set[str] = field(default_factory=set)
    # Username mode: the person's Data Center user keys (lower-cased), from --key and their user
    # objects, the username among them where it is the key. Changelog items name people by key.
    keys: set[str] = field(default_factory=set)
    # Display names met in their user objects (lower-cased): only to tell a custom user picker's
    # changelog item from another custom field's whose option id happens to equal the username.
    display_names: set[str] = field(default_factory=set)

    @property
    def mode(self) -> str:
        return "account-id" if self.account_id is not None else "username"

    @property
    def replacement(self) -> str:
        """What an id naming the person becomes: the account id itself, or the pseudonym."""
        value = self.account_id if self.account_id is not None else self.pseudonym
        assert value is not None, "a username needs its pseudonym first"
        return value

    def search_terms(self) -> list[str]:
        """The person's ids, as the find queries look for them."""
        return [self.account_id if self.account_id is not None else str(self.username), *sorted(self.learned)]

    def owns(self, obj: Mapping[str, Any]) -> bool:
        """True when ``obj`` is one of the person's user objects (by its id fields only)."""
        if self.account_id is not None:
            return obj.get("accountId") == self.account_id
        if not any(marker in obj for marker in USER_OBJECT_MARKERS):
            return False
        name = obj.get("name")
        if isinstance(name, str):
            return name.lower() == str(self.username).lower()
        key = obj.get("key")
        return isinstance(key, str) and (
            key.lower() == str(self.username).lower() or key.lower() in self.learned
        )

    def is_id(self, value: Any) -> bool:
        """True when an id column's value (``user_id`` of a user object) is the person's."""
        if not isinstance(value, str):
            return False
        if self.account_id is not None:
            return value == self.account_id
        return value.lower() == str(self.username).lower()

    def is_change_id(self, value: Any) -> bool:
        """True when a changelog item's ``from``/``to`` is the person's.

        On Data Center these carry the user key. The username stands for it until a key of the
        person's is known; from then on only where it is one of their keys: a renamed user keeps their
        old username as their key, and that username may since have gone to this person, whose key
        is then another (JIRAUSER10600), so the username in an item names the renamed user."""
        if not isinstance(value, str):
            return False
        if value.lower() in self.learned:
            return True
        if self.username is not None and self.keys and self.username.lower() not in self.keys:
            return False
        return self.is_id(value)

    def learn_from(self, document: Any) -> None:
        """Remember the other ids (``name``, ``key``) and the display names in the person's user
        objects in ``document``."""
        for obj in _objects(document):
            if self.owns(obj):
                for id_field in ("name", "key"):
                    value = obj.get(id_field)
                    if isinstance(value, str) and value and not self.is_id(value):
                        self.learned.add(value.lower())
                key = obj.get("key")
                if self.username is not None and isinstance(key, str) and key:
                    self.keys.add(key.lower())
                shown = obj.get("displayName")
                if isinstance(shown, str) and shown and shown != FORMER_USER:
                    self.display_names.add(shown.lower())

    def scrubbed_user(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        scrubbed = {name: obj[name] for name in KEPT_USER_FIELDS if name in obj}
        scrubbed["displayName"] = FORMER_USER
        if self.username is not None:
            for id_field in ("name", "key"):
                if id_field in obj:
                    scrubbed[id_field] = self.replacement
        return scrubbed


def pseudonym_for(username: str, key: str) -> str:
    digest = hmac.new(key.encode("utf-8"), username.lower().encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:PSEUDONYM_HEX_DIGITS]


# -- scrubbing one row (pure: no database) --


def scrub_document(document: Any, person: Person) -> tuple[Any, bool]:
    """``document`` (decoded JSON) with every user object of the person and every changelog item
    naming them scrubbed, and whether anything changed. Changes ``document`` in place."""
    holder = [document]
    changed = False
    stack: list[tuple[Any, Any]] = [(holder, 0)]
    while stack:  # a loop, not recursion: webhook JSON may nest deeper than Python's recursion limit
        container, slot = stack.pop()
        value = container[slot]
        if isinstance(value, dict):
            if person.owns(value):
                scrubbed = person.scrubbed_user(value)
                if scrubbed != value:
                    container[slot] = scrubbed
                    changed = True
                continue
            changed = _scrub_change_item(value, person) or changed
            stack.extend((value, name) for name in value)
        elif isinstance(value, list):
            stack.extend((value, index) for index in range(len(value)))
    return holder[0], changed


def _names_a_user(item: Mapping[str, Any], side: tuple[str, str, str], person: Person) -> bool:
    """Whether one side of a changelog item that names the person's id is about the person.

    Only a numeric id is in doubt: a status, resolution, sprint, version or select option carries a
    numeric id in ``from``/``to``, which a numeric username (an LDAP employee number) or key would
    match. Any other id (a Cloud account id, a username with a letter, a JIRAUSER key) is the
    person's wherever it stands, as before. A numeric one is theirs in a field Cloud marks as a user
    field, in Jira's own assignee/reporter/creator, or where the side's text shows one of the
    person's display names (seen in their user objects or in such items); never in Jira's own
    status-like fields."""
    id_field, text_field, account_field = side
    value = item.get(id_field)
    if account_field in item or not (isinstance(value, str) and value.isdigit()):
        return True
    name = str(item.get("fieldId") or item.get("field") or "").lower()
    if item.get("fieldtype") == "jira" and name in USER_SYSTEM_FIELDS:
        return True
    if item.get("fieldtype") == "jira" and name in NOT_USER_SYSTEM_FIELDS:
        return False
    text = item.get(text_field)
    return isinstance(text, str) and text.lower() in person.display_names


def _scrub_change_item(item: dict[str, Any], person: Person) -> bool:
    changed = False
    for side in _CHANGE_SIDES:
        id_field, text_field, account_field = side
        if id_field not in item or text_field not in item:
            continue  # not a changelog item, or not this side of one
        value = item[id_field]
        by_account = person.account_id is not None and item.get(account_field) == person.account_id
        if not (person.is_change_id(value) or by_account) or not _names_a_user(item, side, person):
            continue
        text = item[text_field]
        if isinstance(text, str) and text != FORMER_USER:
            person.display_names.add(text.lower())  # their name here: the same name elsewhere is theirs
        if text is not None and text != FORMER_USER:
            item[text_field] = FORMER_USER
            changed = True
        if isinstance(value, str) and value != person.replacement:
            item[id_field] = person.replacement
            changed = True
    return changed


def _objects(document: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            found.append(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found


def scrub_task_row(row: Mapping[str, Any], person: Person) -> tuple[Any, ...] | None:
    """The ``scrub_task`` arguments for a locked ``ap_jira_task`` row, or None when nothing names the
    person. The id and display-name columns change where their id is the person's or where the
    issue object they come from (``raw.fields.assignee`` / ``reporter``) is the person's."""
    raw = row["raw"]
    person.learn_from(raw)
    fields = raw.get("fields") if isinstance(raw, dict) else None
    people: list[Any] = []
    columns_changed = False
    for role in ("assignee", "reporter"):
        user_id, name = row[f"{role}_account_id"], row[f"{role}_display_name"]
        obj = fields.get(role) if isinstance(fields, dict) else None
        if person.is_id(user_id) or (isinstance(obj, dict) and person.owns(obj)):
            new_id = person.replacement if person.is_id(user_id) else user_id
            columns_changed = columns_changed or (new_id, FORMER_USER) != (user_id, name)
            user_id, name = new_id, FORMER_USER
        people += [user_id, name]
    raw, raw_changed = scrub_document(raw, person)
    if not (columns_changed or raw_changed):
        return None
    return (row["issue_id"], *people, raw)


def scrub_event_row(row: Mapping[str, Any], person: Person) -> tuple[Any, ...] | None:
    """The ``scrub_event`` arguments for a locked ``ap_jira_task_event`` row, or None."""
    actor_id, actor_name = row["actor_account_id"], row["actor_display_name"]
    actor_changed = False
    if person.is_id(actor_id):
        if isinstance(actor_name, str) and actor_name != FORMER_USER:
            person.display_names.add(actor_name.lower())
        actor_changed = (person.replacement, FORMER_USER) != (actor_id, actor_name)
        actor_id, actor_name = person.replacement, FORMER_USER
    changelog, changelog_changed = scrub_document(row["changelog"], person)
    if not (actor_changed or changelog_changed):
        return None
    return (row["delivery_id"], actor_id, actor_name, changelog)
