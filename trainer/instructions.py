"""Built-in writing instructions for teacher samples (`data.teacher_samples.instruction_fraction`).

An instruct model sampled from a bare document start writes what its pretraining mix starts documents with:
markup, code, tables of numbers (seen on SmolLM2-135M-Instruct). Asked through its chat template for a piece of
writing, it writes fluent prose, verse and dialogue. These instructions (every task with every topic) give the
teacher-sampled corpus the range of general English that users evaluate on; no line comes from an evaluation set.
A file of one instruction per line (`data.teacher_samples.instructions`) replaces them.
"""

from __future__ import annotations

TASKS = (
    "Write a short story about {topic}.",
    "Write a funny short story about {topic}.",
    "Write a poem about {topic}.",
    "Write a limerick about {topic}.",
    "Write a witty one-line quotation about {topic}.",
    "Tell a joke about {topic}.",
    "Write a proverb about {topic} and explain what it means.",
    "Write a letter to a friend about {topic}.",
    "Write a diary entry about {topic}.",
    "Write a newspaper article about {topic}.",
    "Write a dialogue between two people arguing about {topic}.",
    "Write a persuasive essay about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Describe {topic} in vivid detail.",
    "Write a fable about {topic} with a moral at the end.",
    "Write a speech about {topic}.",
    "Give some advice about {topic}.",
    "Write a review of a book about {topic}.",
    "Write the opening paragraph of a novel about {topic}.",
    "Write a sarcastic complaint about {topic}.",
    "Write a short history of {topic}.",
    "List ten surprising facts about {topic}.",
    "Write a philosophical reflection on {topic}.",
    "Write a scene from a play about {topic}.",
    "Write a riddle about {topic} and give its answer.",
    "Write a song about {topic}.",
    "Write an encyclopedia entry about {topic}.",
    "Write a conversation between a child and a grandparent about {topic}.",
    "Write a mock horoscope that mentions {topic}.",
    "Write an anecdote about a famous person and {topic}.",
)

TOPICS = (
    "a lighthouse keeper", "winter in a small town", "friendship", "love", "money", "taxes", "politics", "old age",
    "cats", "dogs", "the sea", "the moon", "computers", "a broken washing machine", "a rainy Monday", "coffee",
    "a job interview", "marriage", "a long train journey", "the meaning of life", "a stubborn mule",
    "learning to cook", "a haunted house", "a wise old king", "a lazy student", "a lost umbrella", "the weather",
    "a dragon who is afraid of the dark", "gardening", "a bank robbery that goes wrong", "chess", "a wedding",
    "a village fair", "the first day of school", "a mathematician", "a lawyer", "a doctor", "a programmer",
    "a sailor", "a farmer", "a philosopher", "a poet", "an astronaut", "a detective", "a ghost", "a robot",
    "the stock market", "democracy", "war and peace", "happiness", "failure", "success", "luck", "time", "death",
    "birthdays", "a family dinner", "neighbours", "an argument about nothing", "a talking parrot", "the circus",
    "a desert island", "a mountain village", "a city at night", "the ocean floor", "a thunderstorm", "autumn",
    "spring", "summer holidays", "a library", "a museum", "a hospital", "a court of law", "a newspaper office",
    "a bakery", "a zoo", "a football match", "the Olympic games", "music", "painting", "a jazz band",
    "an opera singer", "television", "the telephone", "the printing press", "electricity", "trains",
    "bicycles", "ships", "airplanes", "the internet", "email", "bureaucracy", "meetings", "deadlines",
    "a retirement party", "a mischievous child", "a grumpy cat", "a clever fox", "a proud peacock",
    "an honest thief", "a generous miser", "a forgetful professor", "a superstitious sailor", "a fortune teller",
    "wisdom", "foolishness", "honesty", "lies", "ambition", "jealousy", "kindness", "courage", "fear",
    "growing up", "moving house", "a first love", "a broken heart", "an old photograph", "a secret", "a promise",
    "a stranger on a bus", "a traffic jam", "a parking ticket", "a vacation disaster", "a snowstorm",
    "the end of the world", "the future", "the past", "science", "religion", "history", "philosophy",
    "mathematics", "language", "grammar", "writing a book", "reading", "sleep", "dreams", "breakfast",
    "diets", "exercise", "doctors' waiting rooms", "shopping", "advertising", "fashion", "haircuts",
    "a small bookshop", "a shipwreck", "a treasure map", "pirates", "knights", "a castle", "an emperor",
    "a revolution", "an election", "a scandal", "a tax inspector", "a committee", "an elephant", "a whale",
)


def builtin_instructions() -> list[str]:
    """Every task with every topic (30 x 162 instructions), in a fixed order."""
    return [task.format(topic=topic) for task in TASKS for topic in TOPICS]
