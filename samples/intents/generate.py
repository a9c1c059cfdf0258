"""Generate the bank help-line intent sample: 30-way classification, tested on unseen phrasings.

    python samples/intents/generate.py            # rewrites train.jsonl and test.jsonl beside this file

Task shape: classification with many labels; the answer is the label alone. Metric of interest: exact
match.

Customers of the fictional Larkspur Bank write one message; the fixed system prompt lists the 30 intent
labels and the assistant replies with exactly one. Each label has 8 phrasing templates with slots (amounts,
shops, places, days). train.jsonl uses only the first 5 templates of each label and the even-indexed slot
values; test.jsonl (a hidden test set for `edgeft eval` only) uses ONLY the 3 held-back templates and the
odd-indexed slot values, so it measures whether the model learned the intents rather than the sentences.
Labels are balanced: they take turns.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HELD_BACK = 3  # the last templates of every label: test only

INTENTS: dict[str, list[str]] = {
    "card_lost": ["I lost my card", "I can't find my debit card anywhere", "misplaced my card in {place}, help",
                  "my card is gone, I think I dropped it", "lost card, what do I do",
                  "no idea where my bank card went", "I left my card somewhere in {place}", "card's missing, lost it"],
    "card_stolen": ["my card was stolen", "someone stole my wallet with my card in {place}", "card theft to report",
                    "a thief took my card", "my purse was snatched and the card was inside",
                    "I was pickpocketed in {place}", "report a stolen card please", "somebody nicked my card"],
    "card_not_arrived": ["my new card hasn't arrived", "still waiting for my card after {days} days",
                         "where is the card you posted", "card never came in the mail", "no card delivered yet",
                         "it's been {days} days and no card", "replacement card not here", "did you send my card?"],
    "card_declined": ["my card got declined at {shop}", "payment refused at {shop}", "why was my card rejected",
                      "card doesn't work in shops", "declined for {amount} even though I have money",
                      "the terminal at {shop} said declined", "my card keeps bouncing", "transaction not approved"],
    "activate_card": ["how do I activate my new card", "activate card", "my new card needs activating",
                      "turn on the card you sent", "set up the card I just got",
                      "new card arrived, how to start using it", "card activation please", "make my card work"],
    "change_pin": ["I want to change my PIN", "new PIN please", "how do I set a different PIN",
                   "update my card PIN", "can I pick a new PIN number",
                   "switch my PIN to something else", "PIN change", "I'd like another PIN"],
    "pin_blocked": ["my PIN is blocked", "entered the wrong PIN three times", "PIN locked after too many tries",
                    "the ATM says my PIN is blocked", "unblock my PIN",
                    "I got locked out for bad PIN attempts", "PIN blocked at {shop}", "too many wrong PINs"],
    "change_address": ["I moved to {place}, update my address", "change my home address", "new address to register",
                       "I've moved house", "update where I live",
                       "my address is different now", "I relocated to {place}", "please fix my postal address"],
    "change_phone": ["I have a new phone number", "update my mobile number", "change the phone on my account",
                     "my number changed", "new mobile, please update it",
                     "swap my contact number", "phone number update", "I got a different number"],
    "open_account": ["I want to open an account", "how do I become a customer", "open a current account",
                     "sign me up for an account", "new account for my son",
                     "can I start an account with you", "I'd like to join Larkspur", "account opening"],
    "close_account": ["close my account", "I want to leave the bank", "shut down my account please",
                      "how do I cancel my account", "end my banking with you",
                      "terminate my account", "I'm closing everything with Larkspur", "account closure"],
    "check_balance": ["what's my balance", "how much money do I have", "check my balance",
                      "how much is in my account", "current balance please",
                      "tell me what's left in my account", "balance?", "what funds do I have"],
    "transfer_money": ["send {amount} to my sister", "I want to transfer {amount}", "how do I send money",
                       "move {amount} to my savings", "pay my friend {amount}",
                       "wire {amount} to another account", "make a transfer", "I need to send cash to my landlord"],
    "transfer_not_received": ["my transfer hasn't arrived", "sent {amount} but they didn't get it",
                              "the money I sent is missing", "transfer still pending after {days} days",
                              "recipient never got my payment", "where did my transfer go",
                              "the {amount} I sent never landed", "payment to my friend not received"],
    "unknown_charge": ["there's a charge I don't recognise", "what is this {amount} payment to {shop}",
                       "I didn't make this purchase", "strange transaction on my statement",
                       "unknown payment from {shop}", "someone charged me {amount} and it wasn't me",
                       "I never bought anything at {shop}", "mystery charge on my account"],
    "refund_missing": ["my refund hasn't come through", "{shop} refunded me but I see nothing",
                       "still waiting on a refund of {amount}", "where's my refund", "refund not showing",
                       "the shop says they refunded {amount}", "no refund after {days} days", "refund missing"],
    "exchange_rate": ["what's the exchange rate to euros", "how much is {amount} in yen",
                      "currency rate today", "what rate do you give for yen", "exchange rates please",
                      "how much is the pound worth now", "conversion rate for my trip", "rate for swapping currency"],
    "atm_no_cash": ["the ATM didn't give me cash", "machine took {amount} but no money came out",
                    "ATM kept my money", "withdrew {amount} and got nothing", "cash machine error",
                    "the cashpoint in {place} charged me but gave no notes", "no cash from the ATM",
                    "ATM failed but my account was debited"],
    "withdrawal_fee": ["why was I charged a fee for cash", "fee on my ATM withdrawal", "do you charge for withdrawals",
                       "what does it cost to take out cash abroad", "cash withdrawal charges",
                       "there's a fee after I withdrew {amount}", "is taking cash free", "ATM fee question"],
    "loan_application": ["I want a loan", "apply for a personal loan", "can I borrow {amount}",
                         "loan for a new car", "how do I get a loan",
                         "I need to borrow money", "loan application", "could you lend me {amount}"],
    "mortgage_rate": ["what are your mortgage rates", "mortgage interest today", "home loan rate",
                      "how much interest on a mortgage", "rates for buying a house",
                      "what would a mortgage cost me", "mortgage rate", "interest for a house loan in {place}"],
    "overdraft_limit": ["raise my overdraft", "can I get a bigger overdraft", "increase overdraft to {amount}",
                        "what's my overdraft limit", "I need more overdraft",
                        "lift my overdraft", "overdraft limit change", "extend how far I can go below zero"],
    "cancel_direct_debit": ["cancel a direct debit", "stop the direct debit to {shop}", "remove a regular payment",
                            "end my direct debit", "I don't want {shop} taking money anymore",
                            "kill the debit order to {shop}", "stop recurring payment", "direct debit cancel"],
    "statement_request": ["I need a statement", "send me my bank statement", "statement for last month",
                          "can I get a statement for {days} days", "download my statement",
                          "proof of transactions please", "statement request", "print my account history"],
    "app_login": ["I can't log into the app", "app won't let me sign in", "login not working",
                  "the app says wrong password", "locked out of online banking",
                  "can't access my account online", "app login fails", "sign-in error on my phone"],
    "branch_hours": ["when is the branch open", "opening hours for {place} branch", "is the bank open on Sunday",
                     "what time do you close", "branch times please",
                     "till what time is the {place} office open", "hours of the branch", "are you open today"],
    "travel_notice": ["I'm going abroad next week", "tell you I'm travelling to {place}", "travel notice",
                      "using my card overseas soon", "heading to {place} on holiday",
                      "let the bank know I'll be in {place}", "trip abroad, will my card work", "going on a trip"],
    "savings_rate": ["what interest does savings pay", "savings account rate", "how much interest on my savings",
                     "best rate for saving {amount}", "interest on deposits",
                     "what do you pay on savings", "savings interest", "rate for a saver account"],
    "complaint": ["I want to make a complaint", "your service is terrible", "complain about the staff in {place}",
                  "I'm really unhappy with the bank", "file a complaint",
                  "formal complaint please", "this is unacceptable, I want to complain", "how do I complain"],
    "human_agent": ["let me talk to a person", "I want a human", "connect me to an agent",
                    "real person please", "can I speak to someone",
                    "put me through to staff", "operator", "no bot, a human"],
}  # fmt: skip

LABELS = sorted(INTENTS)
SYSTEM = "Classify the Larkspur Bank customer message. Reply with one label only: " + ", ".join(LABELS) + "."
SLOTS = {  # even-indexed values for train, odd-indexed for test
    "place": ["Leeds", "Porto", "Kyoto", "Denver", "Lagos", "Riga", "Perth", "Quito", "Bergen", "Nantes"],
    "shop": ["Tesco", "Fernway", "Bolt Cafe", "Marlo's", "Quickfuel", "Pinecrest", "Zapmart", "Ovidio", "Kettle&Co"],
    "amount": ["£40", "£250", "$75", "€120", "£1,000", "£15", "€60", "$300", "£82.50", "£500"],
    "days": ["5", "10", "3", "14", "7", "12", "4", "9"],
}
OPENERS = ["", "", "", "hi, ", "hello, ", "hey ", "Hi there. ", "excuse me, "]
CLOSERS = ["", "", "", ".", "?", "!", " please", " thanks", "..."]


def message(rng: random.Random, template: str, test: bool) -> str:
    """A customer message from a template: slot values from the split's half, casual opener and closer."""
    values = {slot: rng.choice(options[int(test) :: 2]) for slot, options in SLOTS.items()}
    text = rng.choice(OPENERS) + template.format(**values) + rng.choice(CLOSERS)
    return text[0].upper() + text[1:] if rng.random() < 0.6 else text


def generate(n_train: int = 360, n_test: int = 100, seed: int = 3) -> tuple[list[dict], list[dict]]:
    """Train and test sets; labels take turns, texts are unique, the test set uses held-back templates."""
    rng = random.Random(seed)
    splits, seen = [], set()
    for n, test in ((n_train, False), (n_test, True)):
        rows = []
        for i in range(n):
            label = LABELS[i % len(LABELS)]
            templates = INTENTS[label][-HELD_BACK:] if test else INTENTS[label][:-HELD_BACK]
            text = message(rng, rng.choice(templates), test)
            while text.lower() in seen:
                text = message(rng, rng.choice(templates), test)
            seen.add(text.lower())
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
            rows.append({"messages": [*messages, {"role": "assistant", "content": label}]})
        rng.shuffle(rows)  # the turn-taking order would otherwise teach the label sequence
        splits.append(rows)
    return splits[0], splits[1]


def main() -> None:
    here = Path(__file__).parent
    train, test = generate()
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(here / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"wrote {here / name} ({len(rows)} examples)")


if __name__ == "__main__":
    main()
