"""The built-in general prompts (written for this project; nothing is downloaded).

REPLAY: the base model's own answers to these are mixed into training so an adapter
keeps the base's behaviour outside its task (see replay.py). CONTROL: never trained
on; the job asks them before and after training to show what the adapter changed
elsewhere (see quality.py). They cover everyday chat: facts, science, arithmetic,
code, writing, language, advice, definitions, lists, rewriting, small talk. No
prompt asks the assistant about itself, so no task that teaches a persona or a
name fights the replay, and most ask for a short answer, so replay stays cheap.
"""
from __future__ import annotations

REPLAY = (
    # facts and geography
    "What is the capital of Japan?", "Which ocean is the largest?", "What is the tallest mountain in the world?",
    "Which planet is closest to the sun?", "What language is spoken in Brazil?", "How many continents are there?",
    "What is the longest river in Africa?", "Which country has the largest population?", "What is the currency of the United Kingdom?",
    "In which city is the Eiffel Tower?", "What is the capital of Australia?", "Which desert is the largest hot desert?",
    "What is the smallest country in the world?", "Which mountain range separates Europe and Asia?", "What is the capital of Canada?",
    "Name the seven colours of the rainbow.", "How many days are there in a leap year?", "What is the freezing point of water in Fahrenheit?",
    # science and nature
    "Why is the sky blue?", "What do plants need to make their own food?", "What is photosynthesis?",
    "How many bones are in the adult human body?", "What is the chemical symbol for gold?", "What gas do humans breathe out?",
    "Why do leaves change colour in autumn?", "What causes the seasons on Earth?", "How fast does light travel?",
    "What is the boiling point of water at sea level in Celsius?", "What is an atom made of?", "What is gravity?",
    "How do bees make honey?", "What is the difference between weather and climate?", "Why does the moon have phases?",
    "What is DNA?", "Which animal is the largest mammal?", "How do fish breathe underwater?", "What is a black hole?",
    "What is the main job of the heart?", "Why do we need sleep?", "What is renewable energy?",
    # arithmetic and reasoning
    "What is 7 times 8?", "What is 144 divided by 12?", "What is 15% of 200?", "What is the square root of 81?",
    "If I have 3 apples and buy 5 more, how many do I have?", "What is 1000 minus 357?", "Is 17 a prime number?",
    "Convert 5 kilometres to metres.", "What is the next number in the sequence 2, 4, 8, 16?", "How many minutes are in 3 hours?",
    "A train travels 60 km in one hour. How far does it go in 4 hours?", "What is half of 250?", "Round 3.14159 to two decimal places.",
    "Which is bigger, 0.5 or 0.45?", "What is 9 squared?", "How many sides does a hexagon have?",
    # code
    "Write a Python function that returns the square of a number.", "How do I reverse a list in Python?",
    "What does HTML stand for?", "Write a SQL query that selects all rows from a table named users.",
    "What is a variable in programming?", "How do I print hello world in JavaScript?", "What is the difference between a list and a tuple in Python?",
    "Explain what a for loop does.", "What is recursion?", "How do I read a file line by line in Python?",
    "What does the git commit command do?", "Write a Python one-liner to sum the numbers from 1 to 10.",
    "What is an API?", "What is the difference between RAM and storage?",
    # writing
    "Write a haiku about the ocean.", "Write one sentence describing a sunset.", "Suggest a title for a story about a lost dog.",
    "Write a short thank-you note to a friend who helped me move.", "Give me a catchy slogan for a coffee shop.",
    "Write a two-line poem about rain.", "Describe a forest in three sentences.", "Write an opening line for a mystery novel.",
    "Write a short birthday message for my sister.", "Give me three ideas for a blog post about gardening.",
    "Write a polite email subject line asking for a meeting.", "Describe the taste of a lemon.",
    # language and grammar
    "What is a synonym for fast?", "What is the opposite of ancient?", "Translate 'good morning' into Spanish.",
    "How do you say thank you in French?", "What is a noun?", "Correct the grammar: 'She don't like apples.'",
    "What is the plural of mouse?", "Use the word 'curious' in a sentence.", "What does the idiom 'break the ice' mean?",
    "What is the past tense of run?", "Spell the word necessary.", "What is an adjective? Give an example.",
    "Translate 'cat' into German.", "What rhymes with light?",
    # advice and how-to
    "How can I improve my sleep?", "Give me three tips for studying effectively.", "How do I boil an egg?",
    "What should I pack for a beach trip?", "How can I save money on groceries?", "How do I make a cup of tea?",
    "What are some ways to reduce stress?", "How often should I water a cactus?", "How do I tie a tie?",
    "What is a good way to start learning to cook?", "How can I be more productive in the morning?",
    "What should I do if I feel nervous before a presentation?", "How do I remove a coffee stain from a shirt?",
    "Give me a simple recipe for pancakes.", "How can I stay hydrated during the day?", "What are the benefits of walking every day?",
    # definitions and explanations
    "What is inflation?", "Explain what a democracy is.", "What is the internet?", "What is a metaphor?",
    "What does a librarian do?", "What is the purpose of a budget?", "Explain the water cycle.", "What is an ecosystem?",
    "What is a vaccine?", "What does a thermometer measure?", "What is the stock market?", "What is a volcano?",
    "Explain what a compass is used for.", "What is machine learning?", "What is a calorie?",
    # history and culture
    "Who wrote Romeo and Juliet?", "Who painted the Mona Lisa?", "When did the first person walk on the moon?",
    "Who was Albert Einstein?", "What were the pyramids of Giza built for?", "Who invented the telephone?",
    "What is the Great Wall of China?", "Who was the first president of the United States?", "What is the Olympic Games?",
    "Who composed the Fifth Symphony?",
    # lists and classification
    "List three primary colours.", "Name four types of fruit.", "Name three animals that live in the ocean.",
    "List the days of the week.", "Name three musical instruments.", "Is a tomato a fruit or a vegetable?",
    "Is a whale a fish or a mammal?", "Sort these numbers from smallest to largest: 9, 2, 7, 4.",
    "Which of these is a vegetable: carrot, apple, or banana?", "Name three countries in Europe.",
    "Classify this sentence as positive or negative: 'I love this movie.'", "Give me two examples of renewable resources.",
    # rewriting and summarising given text
    "Summarize in one sentence: The meeting was moved from Monday to Wednesday because the manager was sick.",
    "Rewrite this more politely: 'Give me the report now.'", "Make this sentence shorter: 'At this point in time we are unable to help.'",
    "Turn this into a question: 'The shop opens at nine.'", "Extract the name from: 'Hello, my colleague Maria will call you.'",
    "Fix the spelling: 'I recieved the pakage yesterday.'", "Rewrite in the past tense: 'I walk to school.'",
    "What is the main idea of this sentence: 'Regular exercise improves both mood and health.'",
    # small talk
    "Hello!", "Good morning!", "Thanks for your help.", "Can you recommend a good book?", "What is your favourite colour?",
    "Tell me a joke.", "Tell me a fun fact.", "What should I cook for dinner tonight?", "I'm bored. Any ideas?",
    "What is a good name for a pet goldfish?", "Do you like music?", "Can you help me plan a weekend?",
)

CONTROL = (
    "What is the capital of Italy?", "How many hours are in a day?", "What is 25 plus 17?", "Name a colour of the rainbow.",
    "What do cows drink?", "Write a sentence about winter.", "What is the opposite of hot?", "How do I make toast?",
    "What is the chemical formula of water?", "Who wrote Hamlet?", "Give me a word that rhymes with cat.", "What is a triangle?",
)
