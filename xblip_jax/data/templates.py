"""Instruction templates and text normalisation of X-InstructBLIP's instruction datasets.

The template pools are the reference's (`blip_instruction` processor), verbatim, including its
quirks: one image-caption entry is two templates fused by a missing comma, and a 3D caption
template asks about "this image". Templates are picked with a caller-given
`np.random.Generator`, so that a seeded pipeline draws the same instruction for the same
element every time (the reference draws with Python's global `random`).

What is applied to what, as in the reference:
- caption: instruction = template, lowercased; target = `pre_caption(caption)`.
- qa: instruction = template filled with the RAW question, "??" -> "?", lowercased; target =
  the raw answer (not lowercased). With a caption pool, 3 in 11 questions become yes/no
  questions about the sample's own caption ("yes", 5 in 11) or another one ("no").
- classification: instruction = template, lowercased; target = a short sentence naming the
  label ("i hear a dog"). The reference picks "a"/"an" with the CMU pronouncing dictionary; here
  only the first letter decides (no nltk), so "hour" gets "a".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from xblip_jax.data.example import Example, RecordError

_PUNCT = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")

BINARY_TEMPLATES = {
    "audio": ("do you hear {}?", "is this {}?", "does the audio contain {}?"),
    "pc": ("do you see {}?", "is this {}?", "does the 3d model contain {}?"),
}
CLASSIFICATION_PREFIXES = {
    "audio": ("This is ", "It is ", "I hear ", "The audio is ", "This is the sound of ", ""),
    "default": ("", "This is ", "It is "),
}
# Reference odds, from `random.randint(0, 10)` (11 outcomes): a yes/no question replaces the
# generated one when the draw is < 3, and asks about the sample's own caption when < 5.
BINARY_ODDS = (3, 11)
YES_ODDS = (5, 11)

TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
  "image": {
    "caption": (
      "A short caption:", "A short description:", "A short image caption:",
      "A short image description:", "A photo of", "A photo that shows", "A picture of",
      "A picture that shows", "An image of", "An image that shows", "Write a short description.",
      "Write a description for the image.",
      "Provide a description of what is presented in the image.",
      "Briefly describe the content of the image.",
      "Can you briefly explain what you see in the image?",
      "Could you use a few words to describe what you perceive in the image?",
      "Please provide a short description of the image.",
      "Using language, provide a short account of the image.",
      # A comma is missing here in the reference; the two templates are one string.
      "Use a few words to illustrate what is happening in the photo."
      "Write a description for the photo.",
      "Provide a description of what is presented in the photo.",
      "Briefly describe the content of the photo.",
      "Can you briefly explain what you see in the photo?",
      "Could you use a few words to describe what you perceive in the photo?",
      "Please provide a short description of the picture.",
      "Using language, provide a short account of the picture.",
      "Use a few words to illustrate what is happening in the picture.",
      "Write a description for the picture.",
      "Provide a description of what is presented in the picture.",
      "Briefly describe the content of the picture.",
      "Can you briefly explain what you see in the picture?",
      "Could you use a few words to describe what you perceive in the picture?",
      "Please provide a short description of the picture.",
      "Using language, provide a short account of the picture.",
      "Use a few words to illustrate what is happening in the picture.",
      "What can you tell me about this image?", "Please detail what's in this image.",
      "Narrate the scene captured in this image.", "Describe the main elements in this photo.",
      "Tell me what stands out in this picture.", "What is the focal point of this image?",
      "Please identify the primary subjects in this photo.",
      "Detail the atmosphere or mood of this image.",
      "Paint a verbal picture based on this image.", "Elaborate on the contents of this photo.",
      "How would you introduce this image to someone?", "Share a summary of this image.",
      "What are the notable features of this image?",
      "Highlight the main themes present in this photo.", "Sketch the scene using words.",
      "Enumerate the elements you see in this image.",
      "Characterize the essence of this picture.", "Relate the story depicted in this image.",
      "Describe this image as if speaking to someone who can't see it.",
    ),
    "qa": (
      "{}", "Q: {} A:", "Answer the following question: {}", "Question: {} Answer:",
      "How would you answer {}?", "What is the answer to the question {}?",
      "Answer the question based on the image. Question: {} Answer: ",
      "Instruction: Answer the following question by reference to the input image."
      " Question: {} Answer:",
      "Given the photo, what is the answer to the question {}?",
      "What's your response to the query {}?", "Please provide an answer to {}",
      "Respond to the query {}", "Based on the given image, respond to {}",
      "Question: {} What's your response?", "Consider the following query: {}",
      "Could you help answer the question {}?",
      "Referencing the provided image, can you answer the question {}?",
      "With respect to the image shown, please answer {}",
      "What's your answer to {} in the context of the provided image?",
      "Question (refer to the image for context): {} Answer:",
      "In response to the question {}, what would your answer be?",
      "Considering the details of the image, {}", "Contemplating the image, {}",
      "Upon examining the image, how would you address {}?", "Using the image as a guideline, {}",
      "From the perspective of the image, {}",
      "Please provide a detailed answer to {} based on your insights from the image.",
      "If you were to use the image as a sole reference, how would you address {}?",
      "Factoring in the image's details, what's your take on {}?",
      "In light of the provided image, {}",
      "Relying solely on the image, how would you tackle {}?",
      "Referencing the intricate details of the image, {}",
      "Giving heed to the image, how would you reply to {}?",
      "In the context of the image's attributes, {}",
      "Having the image in mind, provide an answer to {}.", "Reflecting upon the image, {}",
      "Question: {}. Keeping the image in mind, please provide an answer.",
      "By referencing the key aspects of the image, {}",
      "While considering the intricacies of the image, how would you approach answering {}?",
      "Having thoroughly reviewed the image, please respond to {}.",
      "Let's focus on the image. In its context, how would you interpret {}?",
      "With the nuances of the image at the forefront, {}", "Taking a cue from the image, {}",
      "Bearing in mind the characteristics of the image, how would you elucidate {}?",
      "Gauging by the image, {}", "In accordance with the image's specifications, {}",
      "Drawing insights from the image, {}",
    ),
    "classification": (
      "Identify the objects in this image:", "What objects can you spot in the picture?",
      "Classify the objects in the photo:", "Name the objects visible in the image:",
      "Identify and classify the objects in this image:",
      "What type of objects are in the photo?", "Classify the main object in the picture:",
      "Identify the primary object in this image:", "Name the main object visible in the photo:",
      "What is the central object in the image?",
      "Can you classify the central object in this photo?",
      "Determine the type of the main object in this picture:",
      "What objects do you identify in the photo?", "Please classify the objects in the image:",
      "Please identify the main object in the picture:",
      "What kind of object is displayed in the image?",
      "What object is predominantly featured in the photo?",
      "Classify the object that is the focus of this image:",
      "What is the main object in the picture?", "Identify the primary object in the photo:",
    ),
  },
  "video": {
    "caption": (
      "A short caption for the video:", "A short description of the video:", "A video of",
      "A video that shows", "Describe the video briefly.", "Write a description for the video.",
      "Provide a description of what is presented in the video.",
      "Briefly describe the content of the video.",
      "Can you briefly explain what you see in the video?",
      "Could you use a few words to describe what you perceive in the video?",
      "Please provide a short description of the video.",
      "Using language, provide a short account of the video.",
      "Use a few words to illustrate what is happening in the video.",
    ),
    "qa": (
      "Given the video, {}", "Q: {} A:", "Answer the following question based on the video: {}",
      "Question: {} Answer:", "How would you answer {} after watching the video?",
      "What is the answer to the question {} after viewing the video?",
      "Answer the question based on the video. Question: {} Answer: ",
      "Instruction: Answer the following question by reference to the input video."
      " Question: {} Answer:",
      "Given the video, what is the answer to the question {}?",
      "What's your response to the query {} after watching the video?",
      "Please provide an answer to {} after watching the video",
      "Respond to the query {} based on the video", "Based on the given video, respond to {}",
      "Question: {} What's your response after watching the video?",
      "Consider the following query: {}", "Could you help answer the question {}?",
      "Referencing the provided video, can you answer the question {}?",
      "With respect to the video shown, please answer {}",
      "What's your answer to {} in the context of the provided video?",
      "Question (refer to the video for context): {} Answer:",
      "In response to the question {}, what would your answer be after viewing the video?",
    ),
    "classification": (
      "Identify the objects in this video:", "What objects can you spot in the clip?",
      "Classify the objects in the video:", "Name the objects visible in the video:",
      "Identify and classify the objects in this video:",
      "What type of objects are in the video?", "Classify the main object in the clip:",
      "Identify the primary object in this video:", "Name the main object visible in the clip:",
      "What is the central object in the video?",
      "Can you classify the central object in this video?",
      "Determine the type of the main object in this video:",
      "What objects do you identify in the video?", "Please classify the objects in the video:",
      "Please identify the main object in the video:",
      "What kind of object is displayed in the video?",
      "What object is predominantly featured in the video?",
      "Classify the object that is the focus of this video:",
      "What is the main object in the video?", "Identify the primary object in the video:",
    ),
  },
  "audio": {
    "caption": (
      "A short caption:", "A short description:", "An audio of", "An audio that shows",
      "Write a short description.", "Write a description for the audio.",
      "Provide a description of what is presented in the audio.",
      "Briefly describe the content of the audio.",
      "Can you briefly explain what you hear in the audio?",
      "Could you use a few words to describe what you perceive in the audio?",
      "Please provide a short description of the audio.",
      "Using language, provide a short account of the audio.",
      "Use a few words to illustrate what is happening in the audio.",
      "Describe briefly the contents of the audio.",
      "Please provide a brief summary of the audio.", "What does the audio contain?",
      "What can you hear in the audio?", "What sounds are present in the audio?",
      "Summarize the audio in a few words.", "Write a brief summary of the audio content.",
      "Could you provide a concise explanation of the audio's contents?",
      "Describe what the audio represents.", "What is the audio depicting?",
      "In a few words, describe what you hear in the audio.",
    ),
    "qa": (
      "{}", "Question: {} Answer:", "Q: {} A:", "Based on the audio, {}",
      "Answer the following question based on the audio: {}",
      "Question: {} Provide an answer based on the audio.",
      "How would you answer {} based on the audio?",
      "What is the answer to the question {} using the audio as a reference?",
      "Answer the question using the audio. Question: {} Answer: ",
      "Instruction: Answer the following question by referencing the audio. Question: {} Answer:",
      "Given the audio, what is the answer to the question {}?",
      "What's your response to the query {} considering the audio?",
      "Please provide an answer to {} using the audio as context.",
      "Respond to the query {} based on the audio content.",
      "Based on the provided audio, respond to {}",
      "Question: {} What's your response using the audio for context?",
      "Consider the following query and the audio: {}",
      "Could you help answer the question {} using the audio as reference?",
      "Referencing the provided audio, can you answer the question {}?",
      "With respect to the audio provided, please answer {}",
      "What's your answer to {} in the context of the provided audio?",
      "Question (refer to the audio for context): {} Answer:",
      "In response to the question {}, what would your answer be based on the audio?",
      "Given the audio, how would you respond to {}?",
      "Taking the audio into consideration, what is your response to {}?",
      "Based on the audio, how would you answer {}?",
    ),
    "classification": (
      "Classify the following audio:", "What is the category of this audio clip?",
      "Identify the content of the following audio:", "Provide a classification for the audio.",
      "Analyze and categorize the following audio.", "Describe the category of the given audio.",
      "Determine the type of this audio clip.", "Can you classify what you hear in the audio?",
      "What type of audio is this?", "How would you classify this audio clip?",
      "Please identify the category of the following audio:",
      "What category does the following audio fall into?",
      "Classify the sounds in this audio clip.",
    ),
  },
  "pc": {
    "caption": (
      "A short caption:", "A short description:", "A short 3D caption:",
      "A short 3D description:", "A 3D model of", "A 3D model that shows",
      "Write a short description.", "Write a description for the 3D model.",
      "Provide a description of what is presented in the 3D model.",
      "Briefly describe the content of the 3D model.",
      "Can you briefly explain what you see in the 3D model?",
      "Could you use a few words to describe what you perceive in the 3D model?",
      "Please provide a short description of the 3D model.",
      "Using language, provide a short account of the 3D model.",
      "Use a few words to illustrate what is happening in the 3D model.",
      "Describe briefly the contents of the 3D model.",
      "Please provide a brief summary of the 3D model.", "What does the 3D model contain?",
      "What can you identify in the 3D model?", "What structures are present in the 3D model?",
      "Summarize the 3D model in a few words.", "Write a brief summary of the 3D model content.",
      "Could you provide a concise explanation of the 3D model's contents?",
      "Describe what the 3D model represents.", "What is the 3D model depicting?",
      "In a few words, describe what you see in the 3D model.",
      "What can you tell me about this image?", "Please detail what's in this 3D model.",
      "Narrate the scene captured in this 3D model.",
      "Describe the main elements in this 3D model.", "Tell me what stands out in this 3D model.",
      "What is the focal point of this 3D model?",
      "Please identify the primary subjects in this 3D model.",
      "Detail the atmosphere or mood of this 3D model.",
      "Paint a verbal picture based on this 3D model.",
      "Elaborate on the contents of this 3D model.",
      "How would you introduce this 3D model to someone?", "Share a summary of this 3D model.",
      "What are the notable features of this 3D model?",
      "Highlight the main themes present in this 3D model.", "Sketch the scene using words.",
      "Enumerate the elements you see in this 3D model.",
      "Characterize the essence of this 3D model.", "Relate the story depicted in this 3D model.",
      "Describe this 3D model as if speaking to someone who can't see it.",
    ),
    "qa": (
      "{}", "Question: {} Answer:", "Q: {} A:", "Based on the 3D model, {}",
      "Answer the following question based on the 3D model: {}",
      "Question: {} Provide an answer based on the 3D model.",
      "How would you answer {} based on the 3D model?",
      "What is the answer to the question {} using the 3D model as a reference?",
      "Answer the question using the 3D model. Question: {} Answer: ",
      "Instruction: Answer the following question by referencing the 3D model."
      " Question: {} Answer:",
      "Given the 3D model, what is the answer to the question {}?",
      "What's your response to the query {} considering the 3D model?",
      "Please provide an answer to {} using the 3D model as context.",
      "Respond to the query {} based on the 3D model content.",
      "Based on the provided 3D model, respond to {}",
      "Question: {} What's your response using the 3D model for context?",
      "Consider the following query and the 3D model: {}",
      "Could you help answer the question {} using the 3D model as reference?",
      "Referencing the provided 3D model, can you answer the question {}?",
      "With respect to the 3D model provided, please answer {}",
      "What's your answer to {} in the context of the provided 3D model?",
      "Question (refer to the 3D model for context): {} Answer:",
      "In response to the question {}, what would your answer be based on the 3D model?",
      "Given the 3D model, how would you respond to {}?",
      "Taking the 3D model into consideration, what is your response to {}?",
      "Based on the 3D model, how would you answer {}?",
      "Considering the details of the 3D model, {}", "Contemplating the 3D model, {}",
      "Upon examining the 3D model, how would you address {}?",
      "Using the 3D model as a guideline, {}", "From the perspective of the 3D model, {}",
      "Please provide a detailed answer to {} based on your insights from the 3D model.",
      "If you were to use the 3D model as a sole reference, how would you address {}?",
      "Factoring in the 3D model's details, what's your take on {}?",
      "In light of the provided 3D model, {}",
      "Relying solely on the 3D model, how would you tackle {}?",
      "Referencing the intricate details of the 3D model, {}",
      "Giving heed to the 3D model, how would you reply to {}?",
      "In the context of the 3D model's attributes, {}",
      "Having the 3D model in mind, provide an answer to {}.", "Reflecting upon the 3D model, {}",
      "Question: {}. Keeping the 3D model in mind, please provide an answer.",
      "By referencing the key aspects of the 3D model, {}",
      "While considering the intricacies of the 3D model, how would you approach answering {}?",
      "Having thoroughly reviewed the 3D model, please respond to {}.",
      "Let's focus on the 3D model. In its context, how would you interpret {}?",
      "With the nuances of the 3D model at the forefront, {}",
      "Taking a cue from the 3D model, {}",
      "Bearing in mind the characteristics of the 3D model, how would you elucidate {}?",
      "Gauging by the 3D model, {}", "In accordance with the 3D model's specifications, {}",
      "Drawing insights from the 3D model, {}",
    ),
    "classification": (
      "Classify the following 3D model:", "What is the category of this 3D model?",
      "Identify the content of the following 3D model:",
      "Provide a classification for the 3D model.",
      "Analyze and categorize the following 3D model.",
      "Describe the category of the given 3D model.", "Determine the type of this 3D model.",
      "Can you classify what you see in the 3D model?", "What type of 3D model is this?",
      "How would you classify this 3D model?",
      "Please identify the category of the following 3D model:",
      "What category does the following 3D model fall into?",
      "Classify the structures in this 3D model.",
    ),
  },
}


def pre_caption(caption: str, max_words: int = 50) -> str:
  """BLIP caption cleaning: lowercase, `.!"()*#:;~` -> space, collapse runs, strip, 50 words."""
  text = _SPACES.sub(" ", _PUNCT.sub(" ", caption.lower()))
  text = text.rstrip("\n").strip(" ")
  words = text.split(" ")
  return " ".join(words[:max_words]) if len(words) > max_words else text


def blip_question(question: str, max_words: int = 50) -> str:
  """BLIP question cleaning: lowercase, delete `.!"()*#:;~`, strip trailing spaces, 50 words."""
  text = _PUNCT.sub("", question.lower()).rstrip(" ")
  words = text.split(" ")
  return " ".join(words[:max_words]) if len(words) > max_words else text


def discrn_question(question: str) -> str:
  """DisCRn question rewrite: name "the two options", hide the modality, end in one "?"."""
  for old in ("which entity", "which object", "which image", "which audio"):
    question = question.replace(old, "which of the two options")
  question = question.replace("audio", "object").replace("image", "object")
  return pre_caption(f"{question}?".replace("??", "?"))


def sample_template(modality: str, task: str, rng: np.random.Generator) -> str:
  """One template of `TEMPLATES[modality][task]`, uniformly, as written (not lowercased)."""
  try:
    pool = TEMPLATES[modality][task]
  except KeyError:
    raise KeyError(f"no templates for modality {modality!r} and task {task!r}") from None
  return pool[int(rng.integers(len(pool)))]


def classification_target(label: str, modality: str, rng: np.random.Generator) -> str:
  """'[prefix] a/an <label>', lowercased: the target of a classification example."""
  article = "an " if label[:1].lower() in "aeiou" else "a "
  prefixes = CLASSIFICATION_PREFIXES.get(modality, CLASSIFICATION_PREFIXES["default"])
  return (prefixes[int(rng.integers(len(prefixes)))] + article + label).lower()


def binary_question(example: Example, rng: np.random.Generator,
                    captions: Sequence[str]) -> tuple[str, str]:
  """A yes/no question about the example's own caption (`meta["caption"]`) or another one."""
  own = example.meta.get("caption")
  if not own:
    raise RecordError("binary question needs meta['caption']", example.id)
  modality = example.modalities[0]
  if modality not in BINARY_TEMPLATES:
    raise KeyError(f"no yes/no templates for modality {modality!r}")
  yes = int(rng.integers(YES_ODDS[1])) < YES_ODDS[0]
  caption = own
  if not yes:
    others = [c for c in captions if c != own]
    if not others:
      raise RecordError("binary question needs a caption other than its own", example.id)
    caption = others[int(rng.integers(len(others)))]
  templates = BINARY_TEMPLATES[modality]
  return templates[int(rng.integers(len(templates)))].format(caption), "yes" if yes else "no"


def _pick(value: str | Sequence[str], rng: np.random.Generator) -> str:
  if isinstance(value, str):
    return value
  if not value:
    raise RecordError("empty list of targets")
  return value[int(rng.integers(len(value)))]


def instruct(example: Example, rng: np.random.Generator, *, prompt: str = "",
             binary_captions: Sequence[str] | None = None) -> Example:
  """The training text of one visit of `example`: instruction and target filled in.

  Args:
    example: as read; `text_input` holds the raw question (qa) or "", `text_output` the
      caption(s) / answer(s) / label(s) (a tuple: one is drawn).
    rng: drives every random choice (template, target, yes/no question).
    prompt: text put before every template (the reference's processor `prompt`, usually "").
    binary_captions: the dataset's captions; given, qa examples may become yes/no questions
      (the reference's `add_binary`).

  Returns:
    A copy with `text_input` = instruction and `text_output` = target. DisCRn examples are
    returned unchanged: their question is rewritten when read and their target is the label.
  """
  modality, task = example.modalities[0], example.task
  if task == "caption":
    text = prompt + sample_template(modality, "caption", rng)
    return example.replace(text_input=text.lower().strip(),
                           text_output=pre_caption(_pick(example.text_output, rng)))
  if task == "qa":
    question, answer = example.text_input, _pick(example.text_output, rng)
    if binary_captions and int(rng.integers(BINARY_ODDS[1])) < BINARY_ODDS[0]:
      question, answer = binary_question(example, rng, binary_captions)
    text = (prompt + sample_template(modality, "qa", rng).format(question)).replace("??", "?")
    return example.replace(text_input=text.lower().strip(), text_output=answer)
  if task == "classification":
    text = prompt + sample_template(modality, "classification", rng)
    label = _pick(example.text_output, rng)
    return example.replace(text_input=text.lower().strip(),
                           text_output=classification_target(label, modality, rng))
  return example
