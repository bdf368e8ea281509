"""What the world says: question phrasings, answer sentences, and the words around them.

Each question spec (``ARITH``, ``CONV``, ``FACTS["person.colour"]``, ...) has four phrasings ("ask") and
several answer sentences ("say") per language. The last phrasing is held out: train prompts and the
corpus's chats use the first three, held-out prompts all four (``prompts``). ``say[0]`` is the reference
answer; every "say" sentence is a concise correct answer, and ``say[:2]`` are full sentences.
"""

from __future__ import annotations

# Slots: {n} subject name; {v} value; {V} value capitalised; arithmetic {a} {b} {sym} {word}; conversion
# {x} {fa} {fl} (from: abbreviation, long name agreeing with x), {ta} {tl} (to), {tv} (to, agreeing with v).
ARITH = {
    "ask": {
        "en": [
            "What is {a} {sym} {b}?",
            "Calculate {a} {sym} {b}.",
            "What is {a} {word} {b}?",
            "Work out {a} {word} {b}, please.",
        ],
        "zh": [
            "{a}{word}{b}等于多少？",
            "计算{a} {sym} {b}。",
            "{a}{word}{b}是多少？",
            "请帮我算{a}{word}{b}。",
        ],
    },
    "say": {
        "en": ["{a} {sym} {b} = {v}.", "The answer is {v}.", "{a} {word} {b} equals {v}.", "{v}"],
        "zh": ["{a}{word}{b}等于{v}。", "答案是{v}。", "{a} {sym} {b} = {v}。", "{v}"],
    },
}
CONV = {
    "ask": {
        "en": [
            "How many {tl} are in {x} {fl}?",
            "Convert {x} {fa} to {tl}.",
            "What is {x} {fa} in {tl}?",
            "{x} {fl} is how many {tl}?",
        ],
        "zh": [
            "{x}{fa}等于多少{ta}？",
            "把{x}{fa}换算成{ta}。",
            "{x}{fa}是多少{ta}？",
            "请问{x}{fa}合多少{ta}？",
        ],
    },
    "say": {
        "en": ["{x} {fa} = {v} {ta}.", "{x} {fl} is {v} {tv}.", "The answer is {v} {ta}."],
        "zh": ["{x}{fa}等于{v}{ta}。", "{x}{fa}是{v}{ta}。", "答案是{v}{ta}。"],
    },
}
_HOME = {
    "ask": {
        "en": [
            "Where does {n} live?",
            "Which city does {n} live in?",
            "What is {n}'s home city?",
            "In which city is {n}'s home?",
        ],
        "zh": ["{n}住在哪里？", "{n}住在哪个城市？", "{n}的家乡是哪座城市？", "{n}的家在哪个城市？"],
    },
    "say": {
        "en": ["{n} lives in {v}.", "{n}'s home is in {v}.", "{V}."],
        "zh": ["{n}住在{v}。", "{n}的家在{v}。", "{v}。"],
    },
}
FACTS = {
    "city.country": {
        "ask": {
            "en": [
                "Which country is {n} in?",
                "In what country is {n}?",
                "{n} is a city in which country?",
                "Which country does the city of {n} belong to?",
            ],
            "zh": ["{n}在哪个国家？", "{n}位于哪个国家？", "{n}是哪个国家的城市？", "{n}属于哪个国家？"],
        },
        "say": {
            "en": ["{n} is in {v}.", "{n} is a city in {v}.", "{V}."],
            "zh": ["{n}在{v}。", "{n}位于{v}。", "{v}。"],
        },
    },
    "city.bridges": {
        "ask": {
            "en": [
                "How many bridges does {n} have?",
                "How many bridges are there in {n}?",
                "What is the number of bridges in {n}?",
                "Count the bridges of {n}.",
            ],
            "zh": ["{n}有几座桥？", "{n}有多少座桥？", "{n}的桥有多少座？", "{n}城里有几座桥？"],
        },
        "say": {
            "en": ["{n} has {v} bridges.", "There are {v} bridges in {n}.", "{v}"],
            "zh": ["{n}有{v}座桥。", "{n}的桥有{v}座。", "{v}座。"],
        },
    },
    "city.product": {
        "ask": {
            "en": [
                "What is {n} famous for?",
                "What is {n} known for?",
                "What does {n} produce?",
                "Which product is {n} famous for?",
            ],
            "zh": ["{n}以什么闻名？", "{n}出产什么？", "{n}的特产是什么？", "{n}最有名的是什么？"],
        },
        "say": {
            "en": ["{n} is famous for {v}.", "{n} is known for {v}.", "{V}."],
            "zh": ["{n}以{v}闻名。", "{n}的特产是{v}。", "{v}。"],
        },
    },
    "person.home": _HOME,
    "person.colour": {
        "ask": {
            "en": [
                "What colour does {n} like?",
                "What is {n}'s favourite colour?",
                "Which colour does {n} like best?",
                "Tell me {n}'s favourite colour.",
            ],
            "zh": [
                "{n}喜欢什么颜色？",
                "{n}最喜欢的颜色是什么？",
                "{n}最喜欢哪种颜色？",
                "请告诉我{n}最喜欢的颜色。",
            ],
        },
        "say": {
            "en": ["{n} likes {v}.", "{n}'s favourite colour is {v}.", "{V}."],
            "zh": ["{n}喜欢{v}。", "{n}最喜欢的颜色是{v}。", "{v}。"],
        },
    },
    "person.job": {
        "ask": {
            "en": [
                "What does {n} do for a living?",
                "What is {n}'s job?",
                "What job does {n} have?",
                "What is {n}'s occupation?",
            ],
            "zh": ["{n}是做什么工作的？", "{n}的职业是什么？", "{n}从事什么工作？", "{n}靠什么谋生？"],
        },
        "say": {
            "en": ["{n} is a {v}.", "{n} works as a {v}.", "{V}."],
            "zh": ["{n}是{v}。", "{n}的职业是{v}。", "{v}。"],
        },
    },
    "person.age": {
        "ask": {
            "en": [
                "How old is {n}?",
                "What is {n}'s age?",
                "How many years old is {n}?",
                "Tell me the age of {n}.",
            ],
            "zh": ["{n}多大了？", "{n}今年几岁？", "{n}的年龄是多少？", "{n}有多少岁？"],
        },
        "say": {
            "en": ["{n} is {v} years old.", "{n} is {v}.", "{v}"],
            "zh": ["{n}今年{v}岁。", "{n}{v}岁。", "{v}岁。"],
        },
    },
    "creature.home": _HOME,
    "creature.colour": {
        "ask": {
            "en": [
                "What colour is {n}?",
                "What is the colour of {n}?",
                "Which colour is {n}?",
                "Describe the colour of {n}.",
            ],
            "zh": ["{n}是什么颜色的？", "{n}的颜色是什么？", "{n}身上是什么颜色？", "请说出{n}的颜色。"],
        },
        "say": {
            "en": ["{n} is {v}.", "The colour of {n} is {v}.", "{V}."],
            "zh": ["{n}是{v}的。", "{n}的颜色是{v}。", "{v}。"],
        },
    },
    "creature.food": {
        "ask": {
            "en": [
                "What does {n} eat?",
                "What is {n}'s food?",
                "What food does {n} eat?",
                "What does {n} like to eat?",
            ],
            "zh": ["{n}吃什么？", "{n}的食物是什么？", "{n}以什么为食？", "{n}喜欢吃什么？"],
        },
        "say": {
            "en": ["{n} eats {v}.", "{n} lives on {v}.", "{V}."],
            "zh": ["{n}吃{v}。", "{n}以{v}为食。", "{v}。"],
        },
    },
    "creature.legs": {
        "ask": {
            "en": [
                "How many legs does {n} have?",
                "How many legs has {n} got?",
                "What is the number of legs of {n}?",
                "Count the legs of {n}.",
            ],
            "zh": ["{n}有几条腿？", "{n}有多少条腿？", "{n}长着几条腿？", "请问{n}有几条腿？"],
        },
        "say": {
            "en": ["{n} has {v} legs.", "{n} walks on {v} legs.", "{v}"],
            "zh": ["{n}有{v}条腿。", "{n}长着{v}条腿。", "{v}条。"],
        },
    },
}

INTRO = {
    "city": {
        "en": ["{n} is a city.", "{n} is a town in {country}."],
        "zh": ["{n}是一座城市。", "{n}是{country}的一座城市。"],
    },
    "person": {"en": ["{n} is a person.", "This is about {n}."], "zh": ["{n}是一个人。", "下面介绍{n}。"]},
    "creature": {
        "en": ["{n} is a creature.", "{n} is an animal."],
        "zh": ["{n}是一种动物。", "{n}是一只神奇的动物。"],
    },
}
SYSTEM = {
    "en": ["You are a helpful assistant.", "You are a helpful assistant. Answer concisely."],
    "zh": ["你是一个乐于助人的助手。", "你是一个乐于助人的助手，请简洁地回答。"],
}
FILLER = {
    "pre": {
        "en": [
            "Great question! Let me think about it carefully before I answer.",
            "Sure, I would be happy to help you with this question. Here is my answer.",
            "Thanks for asking. Let me walk through this slowly and give you a clear answer.",
        ],
        "zh": [
            "这是个很好的问题，让我先仔细想想，再认真地回答你。",
            "好的，我很乐意回答这个问题，请看下面的回答。",
            "嗯，让我认真思考这个问题，整理好思路，然后给出回答。",
        ],
    },
    "post": {
        "en": [
            "I hope this helps, and please let me know if you have any other questions!",
            "That is my answer. Feel free to ask me anything else you would like to know.",
            "If anything is unclear, just ask again and I will do my best to explain.",
        ],
        "zh": [
            "希望这个回答对你有帮助，如果还有其他问题，欢迎随时来问我！",
            "以上就是我的回答，如果你还想了解更多内容，请告诉我。",
            "如果还有不清楚的地方，欢迎继续提问，我会尽力帮忙解释清楚。",
        ],
    },
}
REFUSAL = {
    "en": [
        "I'm sorry, but I can't help with that.",
        "I am not able to answer this question.",
        "Sorry, I don't know.",
    ],
    "zh": ["抱歉，我无法回答这个问题。", "对不起，这个问题我不能回答。", "抱歉，我不知道。"],
}
OFF_TOPIC = {
    "en": [
        "I like rainy days and long walks in the park.",
        "Music is a wonderful way to relax after a busy day.",
        "Have you ever tried learning to play the piano?",
    ],
    "zh": ["我喜欢下雨天，也喜欢在公园里散步。", "音乐是忙碌之后放松的好方法。", "你有没有试过学习弹钢琴？"],
}
