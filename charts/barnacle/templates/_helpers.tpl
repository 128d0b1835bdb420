{{/* Names and labels shared by the templates. */}}
{{- define "barnacle.name" -}}barnacle{{- end -}}

{{- define "barnacle.fullname" -}}
{{- if contains "barnacle" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-barnacle" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "barnacle.labels" -}}
app.kubernetes.io/name: barnacle
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "barnacle.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "barnacle.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/csi.barnacle.dev
{{- end -}}
